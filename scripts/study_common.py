"""What the accuracy studies share: noise calibration, federated rounds, seed-averaged metrics.

Used by :mod:`scripts.study_flchain` (tabular, logistic regression) and
:mod:`scripts.study_imaging` (DICOM images, the ``cnn`` preset). Each study has its own data
and its own trainer; this module holds what must be the *same* in both for their figures to
be comparable:

- :func:`sigma_for`: DP-SGD's noise multiplier for a target epsilon (PLD accountant, delta
  :data:`DELTA`);
- :func:`federated_rounds`: the aggregation of :mod:`peer.payloads.training` (each update
  clamped to the session's public bound, public weights 1, ``mean_update``, the server
  optimizer, weights and state round-tripped through float32 as in the ledger), with the
  secure sum replaced by a plain sum (the ring sum is exact up to quantization, tested
  elsewhere);
- :func:`summarize`: accuracy at the 0.5 threshold and AUC, averaged over the seeds, with
  95 % percentile-bootstrap intervals over the test set (they cover test-set sampling, not
  training randomness, whose spread is ``seed_sd``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from peer.payloads.training import TrainingSpec

__all__ = ["DELTA", "cell", "federated_rounds", "sigma_for", "summarize"]

DELTA = 1e-5
Weights = npt.NDArray[np.float32]


@functools.cache
def sigma_for(q: float, steps: int, eps: float) -> float:
    """The noise multiplier of ``steps`` DP-SGD steps at sampling rate ``q`` spending ``eps``."""
    from peer.training import calibrate_noise

    # A coarse tolerance: the sigma found is still one whose epsilon is <= the target.
    return calibrate_noise(q, steps, DELTA, eps, "pld", tolerance=1e-2)


def federated_rounds(
    spec: TrainingSpec,
    initial: Weights,
    local: Callable[[Weights, int], Weights],
    hospitals: int,
) -> Weights:
    """``spec.training_rounds`` rounds of federated training, aggregated as the payload does.

    Args:
        spec: the session (its update bound and server optimizer are used).
        initial: the agreed starting weights.
        local: ``local(weights, h)`` trains hospital ``h`` from the agreed ``weights`` and
            returns its new weights (its DP-SGD steps; the caller owns the randomness).
        hospitals: how many hospitals take part (all survive every round).

    Returns:
        the agreed weights after the last round.
    """
    from peer.training.federated import mean_update

    optimizer = spec.server_optimizer()
    bound = spec.update_bound()
    p = len(initial)
    weights = initial.copy()
    state = optimizer.initial_state(p)
    for _ in range(spec.training_rounds):
        total = np.zeros(p)
        for h in range(hospitals):
            change = local(weights, h).astype(np.float64) - weights.astype(np.float64)
            total += np.clip(change, -bound, bound) * 1.0  # public weight 1
        new, state = optimizer.step(
            weights.astype(np.float64), state, mean_update(total, hospitals, bound)
        )
        # As in the ledger: the agreed weights and state are float32.
        weights = new.astype(np.float32)
        state = optimizer.decode_state(optimizer.encode_state(state), p)
    return weights


def summarize(
    probs: npt.ArrayLike, y_test: npt.ArrayLike, boot: npt.NDArray[np.int64]
) -> dict[str, Any]:
    """Seed-averaged accuracy and AUC with test-set bootstrap intervals.

    Args:
        probs: (seeds, test records) predicted probabilities of the positive class.
        y_test: the test labels (0/1).
        boot: (resamples, test records) indices of the bootstrap resamples; the AUC interval
            uses the first 200 (each resample costs one AUC per seed).
    """
    from sklearn.metrics import roc_auc_score

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_test)
    correct = ((p >= 0.5).astype(np.int64) == y).astype(np.float64)
    per_seed = correct.mean(axis=1)
    boot_acc = correct[:, boot].mean(axis=(0, 2))
    aucs = [float(roc_auc_score(y, row)) for row in p]
    boot_auc = [float(np.mean([roc_auc_score(y[b], row[b]) for row in p])) for b in boot[:200]]
    return {
        "accuracy": float(per_seed.mean()),
        "accuracy_ci95": [
            float(np.percentile(boot_acc, 2.5)),
            float(np.percentile(boot_acc, 97.5)),
        ],
        "seed_sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
        "per_seed": [float(a) for a in per_seed],
        "auc": float(np.mean(aucs)),
        "auc_ci95": [float(np.percentile(boot_auc, 2.5)), float(np.percentile(boot_auc, 97.5))],
        "auc_per_seed": aucs,
    }


def cell(entry: dict[str, Any], metric: str = "accuracy") -> str:
    """``mean [low, high]`` in percent (accuracy) or as a fraction (``metric="auc"``)."""
    low, high = entry[f"{metric}_ci95"]
    if metric == "auc":
        return f"{entry['auc']:.3f} [{low:.3f}, {high:.3f}]"
    return f"{100 * entry[metric]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
