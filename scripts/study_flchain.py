"""Accuracy on real clinical data: scikit-survival's ``flchain``, federated DP vs the rest.

Usage::

    python -m scripts.study_flchain [--output bench-results/flchain.json] [--seeds 5]
                                    [--quick]

The data (Dispenzieri et al. 2012, via ``sksurv.datasets.load_flchain``): 7,874 residents of
Olmsted County aged 50 or more, serum free light chains measured at baseline, followed for
death. **Label**: died during follow-up (27.5 %; predicting "alive" for everyone scores
72.5 %). **Features** (9, every transform fixed in advance, so that no statistic of anyone's
data is needed to encode it, and no standardization release is spent):

- age: ``(age - 65) / 10``; sex: 1 for male; mgus (monoclonal gammopathy diagnosed): 0/1;
- kappa and lambda free light chains: ``ln(value / 1.5 mg/dL)``; flc.grp (decile of total
  FLC, 1-10): ``(grp - 5.5) / 3``;
- creatinine: ``ln(value / 1 mg/dL)``, and a missing indicator (17 % missing: the value is
  then the normal 1 mg/dL, i.e. 0);
- sample.yr: ``(year - 1997) / 3`` (a baseline variable; later samples had shorter
  follow-up, so fewer deaths);
- left out: ``chapter``, the *cause* of death, only known for those who died (it would
  leak the label), and the follow-up time (part of the outcome).

**Split**: 20 % of the records (stratified by the label, seed fixed) are a global test set,
the population every model is judged on. The other 80 % are spread over 4 hospitals by age
(sorted by age plus Gaussian jitter of 5 years, cut into four equal parts): hospital 1 sees
mostly people in their fifties (6 % deaths), hospital 4 mostly the oldest (about 60 %), a
strong covariate and label shift, as between a general and a geriatric hospital.

**Models** (logistic regression, the project's ``logreg`` preset, trained by the project's
DP-SGD trainer ``peer.training.local_train``; epsilon from its PLD accountant at delta 1e-5):

- centralized non-private: all training records, plain SGD with the same sampling;
- centralized DP-SGD: all training records in one place, sigma calibrated to epsilon;
- each hospital alone (DP): its records only, sigma calibrated to epsilon for its own
  sampling rate;
- federated (DP): ``rounds`` rounds of ``local_steps`` DP-SGD steps at every hospital, with
  the aggregation of ``peer.payloads.training`` (each update clamped to the session's public
  bound, public weights 1, ``mean_update``, then the server optimizer, weights and state
  round-tripped through float32 as in the ledger); one sigma for the session, the largest
  any hospital needs, so that *every* hospital's epsilon is at most the target. The secure
  sum is replaced by a plain sum (the ring sum is exact up to quantization, tested elsewhere).
  FedAvg, and FedAdam as an extra column.

**Intervals**: every configuration is trained with ``--seeds`` independent seeds (sampling
and noise); the figure is the accuracy averaged over the seeds, and its 95 % interval is a
percentile bootstrap over the *test set* (1,000 resamples of the test records, each scored
by every seed's model): it covers test-set sampling, not training randomness, whose spread
is reported separately (``seed_sd``). AUC is reported alongside.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from scripts import study_common
from scripts.study_common import DELTA, cell, federated_rounds, sigma_for

DEFAULT_OUTPUT = "bench-results/flchain.json"
SEED = 20261130
EPSILONS = (1.0, 3.0, 8.0)
HOSPITALS = 4
FEATURES = (
    "age",
    "sex_male",
    "log_kappa",
    "log_lambda",
    "flc_grp",
    "log_creatinine",
    "creatinine_missing",
    "mgus",
    "sample_yr",
)
Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Settings:
    """The training hyperparameters (public; the same for every epsilon)."""

    epochs: float = 20.0  # centralized and alone: expected passes over the local data
    batch: int = 128  # expected batch of centralized training
    hospital_batch: int = 32  # expected batch at a hospital (alone and federated)
    lr: float = 2.0
    clip: float = 0.5
    rounds: int = 40
    local_steps: int = 20
    server_lr_adam: float = 0.1
    seeds: int = 3
    bootstrap: int = 1000


def load_flchain() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """flchain encoded as in the module docstring: (features, died)."""
    from sksurv.datasets import load_flchain as load

    x, y = load()
    creatinine = x["creatinine"].astype(float)
    missing = creatinine.isna().to_numpy()
    columns = [
        (x["age"].astype(float).to_numpy() - 65.0) / 10.0,
        (x["sex"].astype(str).to_numpy() == "M").astype(float),
        np.clip(np.log(x["kappa"].astype(float).to_numpy() / 1.5), -5, 5),
        np.clip(np.log(x["lambda"].astype(float).to_numpy() / 1.5), -5, 5),
        (x["flc.grp"].astype(int).to_numpy() - 5.5) / 3.0,
        np.where(missing, 0.0, np.clip(np.log(creatinine.fillna(1.0).to_numpy()), -5, 5)),
        missing.astype(float),
        (x["mgus"].astype(str).to_numpy() == "yes").astype(float),
        (x["sample.yr"].astype(int).to_numpy() - 1997.0) / 3.0,
    ]
    features = np.stack(columns, axis=1).astype(np.float32)
    return features, np.asarray(y["death"], dtype=np.int64)


def split(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], rng: np.random.Generator
) -> tuple[list[tuple[Any, Any]], tuple[Any, Any], tuple[Any, Any]]:
    """(hospitals' training sets, pooled training set, global test set)."""
    test = np.zeros(len(y), dtype=bool)
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        test[rng.choice(idx, size=round(0.2 * len(idx)), replace=False)] = True
    train = np.flatnonzero(~test)
    age = x[train, 0] * 10.0 + 65.0
    order = train[np.argsort(age + rng.normal(0.0, 5.0, len(train)), kind="stable")]
    parts = np.array_split(order, HOSPITALS)
    hospitals = [(x[p], y[p]) for p in parts]
    return hospitals, (x[train], y[train]), (x[test], y[test])


class Trainer:
    """One logistic model and one noise generator, reused (one TensorFlow trace)."""

    def __init__(self, settings: Settings) -> None:
        import tensorflow as tf

        from peer.training import ModelSpec, build_model, get_flat_weights

        self.settings = settings
        self.model = build_model(ModelSpec("logreg", len(FEATURES)), SEED)
        self.initial = get_flat_weights(self.model)
        self.generator = tf.random.Generator.from_seed(SEED)

    def train(
        self,
        start: npt.ArrayLike,
        x: Any,
        y: Any,
        *,
        steps: int,
        q: float,
        sigma: float | None,
        seed: int | None = None,
    ) -> npt.NDArray[np.float32]:
        """``steps`` DP-SGD steps (plain SGD if ``sigma`` is None) from ``start``."""
        from peer.training import get_flat_weights, local_train, set_flat_weights

        if seed is not None:
            self.generator.reset_from_seed(seed)
        set_flat_weights(self.model, np.asarray(start, dtype=np.float32))
        local_train(
            self.model,
            x,
            y,
            steps=steps,
            sampling_rate=q,
            lr=self.settings.lr,
            clip_norm=None if sigma is None else self.settings.clip,
            noise_multiplier=sigma or 0.0,
            rng=self.generator,
        )
        return get_flat_weights(self.model)


def scores(weights: npt.ArrayLike, x: Any) -> Array:
    w = np.asarray(weights, dtype=np.float64)
    logits = np.asarray(x, dtype=np.float64) @ w[:-1] + w[-1]
    probabilities: Array = 1.0 / (1.0 + np.exp(-logits))
    return probabilities


def federated(
    trainer: Trainer,
    hospitals: list[tuple[Any, Any]],
    eps: float,
    optimizer_keys: dict[str, Any],
    seed: int,
) -> tuple[npt.NDArray[np.float32], float, list[float]]:
    """Federated DP-SGD with the payload's aggregation; (weights, sigma, each hospital's eps)."""
    from peer.payloads.training import TrainingSpec
    from peer.training import epsilon

    s = trainer.settings
    total_steps = s.rounds * s.local_steps
    rates = [min(1.0, s.hospital_batch / len(y)) for _, y in hospitals]
    # Epsilon grows with q: the smallest hospital's rate needs the largest sigma, and that
    # sigma keeps every hospital within the target.
    sigma = sigma_for(max(rates), total_steps, eps)
    spec = TrainingSpec.from_payload(
        {
            "model": "logreg",
            "input_dim": len(FEATURES),
            "training_rounds": s.rounds,
            "local_steps": s.local_steps,
            "batch_size": s.hospital_batch,
            "lr": s.lr,
            "clip_norm": s.clip,
            "noise_multiplier": sigma,
            "delta": DELTA,
            "max_records": max(len(y) for _, y in hospitals),
            **optimizer_keys,
        }
    )

    def local(weights: npt.NDArray[np.float32], h: int) -> npt.NDArray[np.float32]:
        x, y = hospitals[h]
        return trainer.train(weights, x, y, steps=s.local_steps, q=rates[h], sigma=sigma)

    trainer.generator.reset_from_seed(seed)
    weights = federated_rounds(spec, trainer.initial, local, len(hospitals))
    spent = [epsilon(q, sigma, total_steps, DELTA) for q in rates]
    return weights, sigma, spent


def summarize(
    models: Sequence[npt.ArrayLike], x_test: Any, y_test: Any, boot: npt.NDArray[np.int64]
) -> dict[str, Any]:
    """Seed-averaged accuracy and AUC with test-set bootstrap intervals."""
    return study_common.summarize(np.stack([scores(w, x_test) for w in models]), y_test, boot)


def run(settings: Settings, epsilons: Sequence[float] = EPSILONS) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    x, y = load_flchain()
    hospitals, (x_all, y_all), (x_test, y_test) = split(x, y, rng)
    boot = rng.integers(0, len(y_test), size=(settings.bootstrap, len(y_test)))
    trainer = Trainer(settings)
    seeds = [SEED + 1000 * i for i in range(settings.seeds)]
    s = settings
    q_all = min(1.0, s.batch / len(y_all))
    steps_all = math.ceil(s.epochs / q_all)
    adam = {"optimizer": "fedadam", "server_lr": s.server_lr_adam}
    result: dict[str, Any] = {
        "data": {
            "records": len(y),
            "features": list(FEATURES),
            "death_rate": float(y.mean()),
            "test_records": len(y_test),
            "hospitals": [
                {
                    "records": len(hy),
                    "death_rate": float(hy.mean()),
                    "mean_age": float(65 + 10 * hx[:, 0].mean()),
                }
                for hx, hy in hospitals
            ],
            "majority_accuracy": float(max(y_test.mean(), 1 - y_test.mean())),
        },
        "settings": settings.__dict__,
        "delta": DELTA,
    }
    start = time.perf_counter()
    result["centralized_nonprivate"] = summarize(
        [
            trainer.train(
                trainer.initial, x_all, y_all, steps=steps_all, q=q_all, sigma=None, seed=sd
            )
            for sd in seeds
        ],
        x_test,
        y_test,
        boot,
    )
    rows = []
    for eps in epsilons:
        row: dict[str, Any] = {"epsilon": eps}
        sigma = sigma_for(q_all, steps_all, eps)
        row["centralized_dp"] = {
            "sigma": sigma,
            **summarize(
                [
                    trainer.train(
                        trainer.initial,
                        x_all,
                        y_all,
                        steps=steps_all,
                        q=q_all,
                        sigma=sigma,
                        seed=sd,
                    )
                    for sd in seeds
                ],
                x_test,
                y_test,
                boot,
            ),
        }
        alone = []
        # The hospitals are (almost) the same size: one sampling rate and step count, those
        # of the smallest, whose sigma keeps every hospital within the target.
        q = min(1.0, s.hospital_batch / min(len(hy) for _, hy in hospitals))
        steps = math.ceil(s.epochs / q)
        h_sigma = sigma_for(q, steps, eps)
        for hx, hy in hospitals:
            models = [
                trainer.train(trainer.initial, hx, hy, steps=steps, q=q, sigma=h_sigma, seed=sd)
                for sd in seeds
            ]
            alone.append({"sigma": h_sigma, **summarize(models, x_test, y_test, boot)})
        row["alone_dp"] = alone
        for name, keys in (("federated_fedavg", {}), ("federated_fedadam", adam)):
            runs = [federated(trainer, hospitals, eps, keys, sd) for sd in seeds]
            row[name] = {
                "sigma": runs[0][1],
                "epsilon_per_hospital": runs[0][2],
                **summarize([r[0] for r in runs], x_test, y_test, boot),
            }
        fed, central = row["federated_fedavg"], row["centralized_dp"]
        row["targets"] = {
            "federated_ge_centralized_dp_minus_1pt": fed["accuracy"] >= central["accuracy"] - 0.01,
            "federated_above_every_hospital_disjoint_ci": all(
                fed["accuracy_ci95"][0] > a["accuracy_ci95"][1] for a in alone
            ),
        }
        rows.append(row)
    result["by_epsilon"] = rows
    result["seconds"] = time.perf_counter() - start
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        "accuracy % (seed mean) [95% test-set bootstrap]",
        f"centralized non-private: {cell(result['centralized_nonprivate'])}   "
        f"(majority class: {100 * result['data']['majority_accuracy']:.1f})",
        "eps | centralized DP | federated FedAvg | federated FedAdam | hospitals alone (DP)",
    ]
    for row in result["by_epsilon"]:
        alone = "; ".join(cell(a) for a in row["alone_dp"])
        lines.append(
            f"{row['epsilon']:g} | {cell(row['centralized_dp'])} | "
            f"{cell(row['federated_fedavg'])} | {cell(row['federated_fedadam'])} | {alone}"
        )
        lines.append(f"    targets: {row['targets']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    args = parser.parse_args(argv)
    settings = Settings(seeds=args.seeds)
    epsilons: Sequence[float] = EPSILONS
    if args.quick:
        settings = Settings(epochs=1.0, rounds=2, local_steps=3, seeds=2, bootstrap=50)
        epsilons = (3.0,)
    result = run(settings, epsilons)
    result["command"] = "python -m scripts.study_flchain " + " ".join(argv or sys.argv[1:])
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    print(table(result))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
