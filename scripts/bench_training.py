"""Benchmark of local training: DP-SGD step cost and federated accuracy under DP.

Usage: ``python -m scripts.bench_training [--output bench-results/training.json] [--quick]``

Part 1 times one DP-SGD step and one plain SGD step (batch 256) for a ~12k- and a ~1M-parameter
MLP, interleaved in the same run so that machine load affects both alike (after a warm-up,
the median of several repetitions of a compiled loop of steps, divided by the loop length;
``ratio_of_fastest`` divides the fastest repetitions, the least disturbed by other jobs).

It also times the small CNN of issue 12 (two Conv2D layers and a Dense head on 64x64
grayscale, 105,185 parameters, declared as Keras JSON and trained by
``peer.training.layerwise.LayerwiseDPSGD``), DP step vs plain step interleaved, and the two
exact ways of taking a convolution's per-example kernel norm (ghost norm on unfolded patches
vs the materialized per-example kernel gradient) at a small batch, since the ghost norm's
``B x T x T`` Gram matrices (T = 3,844 output positions) do not fit in memory at batch 256.
For the MLPs, ``noise_ms`` is the time of the noise draw alone (one Gaussian per parameter).
The MLPs run as ``trainer_for`` builds them: the 12k-parameter one in the padded XLA loop, the
1M-parameter one in the graph loop (``peer.training.dpsgd.XLA_MAX_PARAMETERS``); the row
``mlp(128, 64) graph`` forces the graph loop on the small MLP, for comparison (no target).

Part 2 splits the bundled breast-cancer data non-IID (Dirichlet 0.5) across 3 hospitals and
reports test accuracy on the union of the hospitals' test sets for: federated DP-SGD at
epsilon 1, 3 and 8 per hospital (delta 1e-5, PLD accounting over all local steps of all
rounds), each hospital alone with the same privacy, each hospital alone without privacy, and
centralized non-private training. Federated averaging uses the plain numpy sum here.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUTPUT = "bench-results/training.json"
SEED = 20240611


def _median_step_ms(fn: Callable[[], object], steps_per_call: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3 / steps_per_call


def bench_steps(reps: int, loop: int) -> list[dict[str, Any]]:
    """Median time per step of DP-SGD and plain SGD for two MLP sizes."""
    import tensorflow as tf

    from peer.training import DPSGD, ModelSpec, build_model

    rows = []
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(256, 30)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    configs: list[tuple[tuple[int, ...], float | None, bool | None]] = [
        ((128, 64), 1.2, None),
        ((128, 64), None, False),
        ((1024, 1024), 1.7, None),
    ]
    for hidden, target, xla in configs:
        spec = ModelSpec("mlp", 30, hidden=hidden)
        # DP and plain trainers of the same kind (same loop, same compilation).
        dp = DPSGD(build_model(spec, 0), xla=xla)
        sgd = DPSGD(build_model(spec, 0), xla=xla)
        generator = tf.random.Generator.from_seed(SEED)

        # sampling_rate=1 makes every batch the full 256 examples; both variants run the
        # same compiled loop, so only the step itself differs.
        dp_run = functools.partial(
            dp.run,
            x,
            y,
            steps=loop,
            sampling_rate=1.0,
            lr=0.01,
            clip_norm=1.0,
            noise_multiplier=1.0,
            generator=generator,
        )
        sgd_run = functools.partial(
            sgd.run,
            x,
            y,
            steps=loop,
            sampling_rate=1.0,
            lr=0.01,
            clip_norm=None,
            noise_multiplier=0.0,
            generator=generator,
        )
        for _ in range(2):
            dp_run()
            sgd_run()
        dp_ms, sgd_ms = [], []
        for _ in range(reps):
            dp_ms.append(_median_step_ms(dp_run, loop, 1))
            sgd_ms.append(_median_step_ms(sgd_run, loop, 1))
        dp_med, sgd_med = float(np.median(dp_ms)), float(np.median(sgd_ms))
        noise_ms = _noise_ms(spec.n_parameters(), loop, reps)
        rows.append(
            {
                "model": f"mlp{hidden}" + ("" if xla is None else " graph"),
                "xla": dp.xla,
                "parameters": spec.n_parameters(),
                "batch": 256,
                "dp_step_ms": dp_med,
                "sgd_step_ms": sgd_med,
                "noise_ms": noise_ms,
                "ratio": dp_med / sgd_med,
                # Fastest repetition of each: the least disturbed by other jobs on a shared
                # machine (the median is the headline figure).
                "ratio_of_fastest": min(dp_ms) / min(sgd_ms),
                "target_ratio": target,
                "meets_target": None if target is None else dp_med / sgd_med <= target,
            }
        )
    rows.append(bench_cnn(reps))
    return rows


def _noise_ms(n_params: int, loop: int, reps: int) -> float:
    """Time of one step's noise draw alone (the floor of the DP step's extra cost)."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(SEED)

    def loop_of_draws() -> Any:
        total = tf.constant(0.0)
        for _ in tf.range(loop):
            total += generator.normal([n_params])[0]
        return total

    draws = tf.function(loop_of_draws)
    draws()
    return float(np.median([_median_step_ms(draws, loop, 1) for _ in range(reps)]))


def cnn_json() -> str:
    """The benchmark CNN as a declared model: 64x64x1 -> 2 x (Conv2D 3x3, max-pool) -> Dense."""
    import keras

    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((64, 64, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(1),
        ],
        name="cnn64",
    )
    return str(model.to_json())


def bench_cnn(reps: int) -> dict[str, Any]:
    """DP step vs plain step (batch 256) for the CNN, and the two conv norm methods."""
    import tensorflow as tf

    from peer.training.declared import ModelPolicy, build_declared_model
    from peer.training.layerwise import LayerwiseDPSGD

    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(256, 64, 64, 1)).astype(np.float32)
    y = (x[:, 32, 32, 0] > 0).astype(np.float32)
    policy = ModelPolicy()
    dp = LayerwiseDPSGD(build_declared_model(cnn_json(), 0, policy))
    sgd = LayerwiseDPSGD(build_declared_model(cnn_json(), 0, policy))
    generator = tf.random.Generator.from_seed(SEED)

    def dp_step() -> None:
        dp.dp_step(
            x,
            y,
            lr=0.01,
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=256,
            generator=generator,
        )

    def sgd_step() -> None:
        sgd.sgd_step(x, y, lr=0.01, expected_batch_size=256)

    for _ in range(2):
        dp_step()
        sgd_step()
    dp_ms, sgd_ms = [], []
    for _ in range(reps):
        dp_ms.append(_median_step_ms(dp_step, 1, 1))
        sgd_ms.append(_median_step_ms(sgd_step, 1, 1))
    # Per-example norms only, both exact methods, at a batch where the ghost norm fits.
    small = x[:8], y[:8]
    norm_ms = {}
    for method in ("ghost", "materialize"):
        trainer = LayerwiseDPSGD(build_declared_model(cnn_json(), 0, policy), linear_norm=method)
        trainer.per_example_norms(*small)
        norms = functools.partial(trainer.per_example_norms, *small)
        norm_ms[method] = float(np.median([_median_step_ms(norms, 1, 1) for _ in range(3)]))
    dp_med, sgd_med = float(np.median(dp_ms)), float(np.median(sgd_ms))
    return {
        "model": "cnn64 (2 conv)",
        "parameters": dp.model.count_params(),
        "batch": 256,
        "dp_step_ms": dp_med,
        "sgd_step_ms": sgd_med,
        "ratio": dp_med / sgd_med,
        "ratio_of_fastest": min(dp_ms) / min(sgd_ms),
        "target_ratio": 2.0,
        "meets_target": dp_med / sgd_med <= 2.0,
        "conv_norms_batch8_ms": norm_ms,
    }


def bench_accuracy(quick: bool) -> dict[str, Any]:
    """Federated DP vs hospitals alone vs centralized on the bundled data set."""
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
        epsilon,
        evaluate_sums,
        fedavg_round,
        get_flat_weights,
        local_train,
        metrics_from_sums,
        set_flat_weights,
    )

    rng = np.random.default_rng(SEED)
    records = breast_cancer_records(rng)
    parts = split_dataset(records, 3, "dirichlet", alpha=0.5, rng=rng)

    def arrays(part: Sequence[Any], split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in part if r.split == split]
        return np.stack([r.features for r in rows]), np.array([r.label for r in rows])

    raw_train = [arrays(p, "train") for p in parts]
    raw_test = [arrays(p, "test") for p in parts]
    # Federated standardization: in the peer, these vectors are summed by secure aggregation.
    total = sum(local_feature_stats(x) for x, _ in raw_train)
    mean, std = global_standardizer(total, 30)
    train = [(standardize(x, mean, std), y) for x, y in raw_train]
    x_test = np.concatenate([standardize(x, mean, std) for x, _ in raw_test])
    y_test = np.concatenate([y for _, y in raw_test])

    spec = ModelSpec("logreg", 30)
    rounds, local_steps, q, lr, clip, delta = 10, 10, 0.2, 1.0, 1.0, 1e-5
    if quick:
        rounds = 4
    total_steps = rounds * local_steps

    def accuracy(weights: np.ndarray) -> float:
        model = build_model(spec, SEED)
        set_flat_weights(model, weights)
        return metrics_from_sums(evaluate_sums(model, x_test, y_test))["accuracy"]

    def alone(x: np.ndarray, y: np.ndarray, sigma: float | None, seed: int) -> float:
        model = build_model(spec, SEED)
        local_train(
            model,
            x,
            y,
            steps=total_steps,
            sampling_rate=q,
            lr=lr,
            clip_norm=clip if sigma is not None else None,
            noise_multiplier=sigma or 0.0,
            rng=tf.random.Generator.from_seed(seed),
        )
        return accuracy(get_flat_weights(model))

    result: dict[str, Any] = {
        "dataset": "sklearn breast cancer (569 x 30), Dirichlet(0.5) split, 3 hospitals",
        "hospitals": [
            {
                "train": len(y),
                "train_malignant": int(y.sum()),
                "test": len(yt),
                "test_malignant": int(yt.sum()),
            }
            for (_, y), (_, yt) in zip(train, raw_test, strict=True)
        ],
        "test_examples": len(y_test),
        "model": "logreg",
        "rounds": rounds,
        "local_steps_per_round": local_steps,
        "sampling_rate": q,
        "lr": lr,
        "clip_norm": clip,
        "delta": delta,
    }
    x_all = np.concatenate([x for x, _ in train])
    y_all = np.concatenate([y for _, y in train])
    result["centralized_non_private"] = alone(x_all, y_all, None, 1)
    result["alone_non_private"] = [alone(x, y, None, 2 + i) for i, (x, y) in enumerate(train)]
    result["by_epsilon"] = []
    start = get_flat_weights(build_model(spec, SEED))
    for eps in (1.0, 3.0, 8.0):
        sigma = calibrate_noise(q, total_steps, delta, eps, "pld")
        spent = epsilon(q, sigma, total_steps, delta, "pld")
        peers = [
            PeerData(
                f"hospital_{i + 1}",
                x,
                y,
                build_model(spec, SEED),
                tf.random.Generator.from_seed(100 * i + int(eps)),
            )
            for i, (x, y) in enumerate(train)
        ]
        config = LocalTrainConfig(local_steps, q, lr, clip, sigma)
        weights = start
        for _ in range(rounds):
            weights = fedavg_round(weights, peers, config=config).weights
        result["by_epsilon"].append(
            {
                "epsilon_target": eps,
                "noise_multiplier": sigma,
                "epsilon_spent_pld": spent,
                "federated": accuracy(weights),
                "alone_dp": [alone(x, y, sigma, 10 + i) for i, (x, y) in enumerate(train)],
            }
        )
    at3 = next(r for r in result["by_epsilon"] if r["epsilon_target"] == 3.0)
    result["target_eps3_federated_ge_0.94"] = at3["federated"] >= 0.94
    result["target_eps3_above_every_hospital_alone_dp"] = at3["federated"] > max(at3["alone_dp"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print a table and write JSON. Returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and rounds")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)

    reps, loop = (3, 10) if args.quick else (11, 30)
    steps = bench_steps(reps, loop)
    print(
        f"{'model':<26}{'params':>10}{'DP ms':>10}{'SGD ms':>10}{'ratio':>8}{'target':>8}"
        f"{'noise ms':>10}{'fastest':>9}"
    )
    for row in steps:
        noise = f"{row['noise_ms']:>10.3f}" if "noise_ms" in row else ""
        target = "-" if row["target_ratio"] is None else f"{row['target_ratio']:.1f}"
        fastest = f"{row['ratio_of_fastest']:>9.2f}" if "ratio_of_fastest" in row else ""
        print(
            f"{row['model']:<26}{row['parameters']:>10}{row['dp_step_ms']:>10.3f}"
            f"{row['sgd_step_ms']:>10.3f}{row['ratio']:>8.2f}{target:>8}{noise}{fastest}"
        )
        if "conv_norms_batch8_ms" in row:
            methods = ", ".join(f"{k} {v:.1f} ms" for k, v in row["conv_norms_batch8_ms"].items())
            print(f"  CNN per-example norms at batch 8: {methods}")
    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "steps": steps,
    }
    if not args.skip_accuracy:
        acc = bench_accuracy(args.quick)
        report["accuracy"] = acc
        print(f"\ncentralized non-private: {acc['centralized_non_private']:.4f}")
        alone_np = ", ".join(f"{a:.4f}" for a in acc["alone_non_private"])
        print(f"each hospital alone, non-private: {alone_np}")
        print(f"{'epsilon':>8}{'sigma':>8}{'federated':>11}  hospitals alone (same DP)")
        for row in acc["by_epsilon"]:
            alone_dp = ", ".join(f"{a:.4f}" for a in row["alone_dp"])
            print(
                f"{row['epsilon_target']:>8.1f}{row['noise_multiplier']:>8.3f}"
                f"{row['federated']:>11.4f}  {alone_dp}"
            )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
