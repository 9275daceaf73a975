"""Per-round RMSE of an in-process regression session, released and exact, over seeds.

Why a round sometimes "gets worse" (issue 12, lane b): the agreed RMSE of each round is a
noisy release (``eval_noise``), the model itself moves by DP-SGD noise and by its step
size. This runs the path of ``tests/payloads/test_training_tasks.py``: three hospitals hold
scikit-learn's diabetes records (Dirichlet split, alpha 1), each a :class:`TrainingPayload`
whose ``prepare``/``conclude`` run the real rounds (standardization, training, evaluation)
with the ring sum replaced by a plain sum. For the model entering every round after the
standardization it records the agreed (released) RMSE and the exact RMSE of that model over
the union of the hospitals' test splits, which is what the release estimates.

Seeded for repetition (a real peer draws every noise from the OS CSPRNG): per seed the
DP-SGD noise and sampling, the quantization and the release noise. The privacy accounting
is skipped: it does not change what is trained or released, and it lets a near-zero noise
multiplier isolate the other effects.

    python -m scripts.study_regression_rounds --seeds 1-10 --training-rounds 4 \\
        [--lr 0.25] [--noise-multiplier 0.01] [--eval-noise 0.5] [--exact-eval]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

PEERS = ("hospital-a", "hospital-b", "hospital-c")
# The regression session of tests/payloads/test_training_tasks.py (eval_noise as in its
# "real noise" test): disease progression 25-346, centred on 180, within +-200 of it.
PAYLOAD: dict[str, Any] = {
    "kind": "training",
    "model": "logreg",
    "input_dim": 10,
    "training_rounds": 2,
    "local_steps": 30,
    "batch_size": 16,
    "lr": 0.5,
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "max_records": 1000,
    "feature_bound": 0.2,
    "standardize_noise": 1.0,
    "eval_noise": 1.0,
    "task": "regression",
    "target_bound": 200.0,
    "target_center": 180.0,
    "residual_bound": 300.0,
}


class _ZeroNoise:
    """Release noise of zeros (``--exact-eval``): the agreed metrics are then exact."""

    def normal(self, loc: float, scale: float, size: Any) -> npt.NDArray[np.float64]:
        return np.zeros(size)


def _seeded(generator: np.random.Generator) -> Callable[[], np.random.Generator]:
    """The release-noise factory of a payload, drawing from one seeded generator."""
    return lambda: generator


def run_seed(seed: int, payload: dict[str, Any], exact_eval: bool) -> dict[str, Any]:
    """One session; the released and exact RMSE of the model entering each round >= 2."""
    import tensorflow as tf

    from peer.data import diabetes_feature_names, diabetes_records, split_dataset, standardize
    from peer.session import SessionProposal
    from peer.training import model_outputs, set_flat_weights
    from scripts.inprocess_training import local_hospitals, plain_round

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts = split_dataset(
            diabetes_records(np.random.default_rng(0)),
            3,
            "dirichlet",
            alpha=1.0,
            rng=np.random.default_rng(1),
        )
        proposal = SessionProposal(
            session_id="train",
            participants=PEERS,
            rounds=payload["training_rounds"] + 2,
            threshold=3,
            payload=payload,
            bits=64,
            seed=3,
        )
        hospitals = local_hospitals(
            root, proposal, parts, diabetes_feature_names(), max_epsilon=math.inf
        )
        for i, hospital in enumerate(hospitals):
            hospital.rng = np.random.default_rng(seed * 10 + i)
            hospital._keras_model()
            hospital._noise = tf.random.Generator.from_seed(seed * 100 + i)
            if exact_eval:
                hospital.noise = _ZeroNoise  # type: ignore[assignment]
            else:
                hospital.noise = _seeded(np.random.default_rng(seed * 1000 + i))
            hospital._check_budget = lambda round_, events: 0.0  # type: ignore[method-assign]
            hospital.round_events = lambda round_: []  # type: ignore[method-assign]
        released: list[float | None] = []
        exact: list[float] = []
        released_n: list[int] = []
        for round_ in range(1, proposal.rounds + 1):
            plain_round(hospitals, round_)
            if round_ == 1:
                continue
            metrics = hospitals[0].ledger.agreed_records("train")[-1].record.metrics
            rmse = metrics["rmse"]
            released.append(float(rmse) if isinstance(rmse, int | float) else None)
            released_n.append(int(str(metrics["n"])))
            model = hospitals[0]._keras_model()
            set_flat_weights(model, hospitals[0].global_weights(round_))
            mean, std = hospitals[0]._standardizer()
            residuals = []
            for hospital in hospitals:
                x, y = hospital.site.arrays("test")
                outputs = model_outputs(model, standardize(x, mean, std)).reshape(-1)
                predicted = outputs * payload["target_bound"] + payload["target_center"]
                bound = payload["residual_bound"]
                residuals.append(np.clip(predicted - y, -bound, bound))
            r = np.concatenate(residuals)
            exact.append(float(math.sqrt(np.mean(r * r))))
        return {
            "seed": seed,
            "released": released,
            "exact": exact,
            "released_n": released_n,
            "n": len(r),
        }


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the seeds, and how often training round 2 left a worse model than round 1
    (index 2 vs 1: the models entering the rounds after the first and second training)."""
    exact = np.array([r["exact"] for r in runs])
    released = np.array([np.nan if v is None else v for r in runs for v in r["released"]])
    released = released.reshape(exact.shape)
    return {
        "exact_mean": np.round(exact.mean(0), 1).tolist(),
        "exact_sd": np.round(exact.std(0, ddof=1), 1).tolist(),
        "released_mean": np.round(np.nanmean(released, 0), 1).tolist(),
        "released_sd": np.round(np.nanstd(released, 0, ddof=1), 1).tolist(),
        "released_zero": int(np.sum(released == 0.0)),
        "exact_worse_after_round_2": int(np.sum(exact[:, 2] > exact[:, 1])),
        "released_worse_after_round_2": int(np.sum(released[:, 2] > released[:, 1])),
        "released_minus_exact": round(float(np.nanmean(released[:, 1:] - exact[:, 1:])), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", default="1-10", help="e.g. 1-10 or 1,2,3")
    parser.add_argument("--training-rounds", type=int, default=2)
    parser.add_argument("--lr", type=float, default=PAYLOAD["lr"])
    parser.add_argument("--noise-multiplier", type=float, default=PAYLOAD["noise_multiplier"])
    parser.add_argument("--eval-noise", type=float, default=PAYLOAD["eval_noise"])
    parser.add_argument("--exact-eval", action="store_true", help="no release noise")
    args = parser.parse_args(argv)
    payload = {
        **PAYLOAD,
        "training_rounds": args.training_rounds,
        "lr": args.lr,
        "noise_multiplier": args.noise_multiplier,
        "eval_noise": args.eval_noise,
    }
    runs = []
    for seed in _seeds(args.seeds):
        runs.append(run_seed(seed, payload, args.exact_eval))
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"settings": vars(args), **summarize(runs)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
