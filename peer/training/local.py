"""Local training and evaluation, producing vectors that secure aggregation can *sum*.

Everything a hospital contributes to a round is a sum, never an average: the model delta is
multiplied by the example count by the caller, and :func:`evaluate_sums` returns counts and
loss sums, so adding the vectors of all hospitals gives the consortium's totals.

Layout of the evaluation vector (``n_bins`` = 20 by default), all float64::

    [loss_sum, correct, TP, FP, TN, FN, n, pos_hist[0..n_bins), neg_hist[0..n_bins)]

``pos_hist``/``neg_hist`` count positive/negative examples by predicted probability in equal
bins over [0, 1]; the AUC is computed from them (ties within a bin count one half).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .dpsgd import secure_generator, trainer_for
from .losses import Loss, binary_logit_loss
from .model import get_flat_weights

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = [
    "EVAL_HEADER",
    "evaluate_sums",
    "histogram_auc",
    "local_train",
    "metrics_from_sums",
    "model_outputs",
    "predict_proba",
    "update_bound",
]

EVAL_HEADER = ("loss_sum", "correct", "tp", "fp", "tn", "fn", "n")
_EVAL_BATCH = 8192


def local_train(
    model: keras.Model,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    sampling_rate: float | None = None,
    batch_size: int | None = None,
    lr: float,
    clip_norm: float | None,
    noise_multiplier: float,
    rng: tf.random.Generator | None = None,
    prox_mu: float = 0.0,
    loss: Loss = binary_logit_loss,
) -> tuple[npt.NDArray[np.float32], int, int]:
    """Train ``model`` in place on local data and return the change of its weights.

    Give the length as ``steps`` or ``epochs`` (``steps = ceil(epochs / q)``), and the
    Poisson sampling rate as ``sampling_rate`` or as an expected ``batch_size``
    (``q = batch_size / n``). ``clip_norm=None`` trains without privacy (plain SGD with the
    same sampling); otherwise DP-SGD with the given clip norm and noise multiplier. The
    caller is responsible for having charged the privacy budget for ``steps`` steps at
    ``q`` and ``noise_multiplier`` before calling.

    Args:
        rng: the noise and sampling generator. None draws a fresh one from ``os.urandom``
            (a real peer should keep one generator per session instead, which also avoids
            re-tracing the TensorFlow graph).
        prox_mu: FedProx's proximal coefficient (0: plain DP-SGD); the pull towards the
            starting (global) weights is added after clipping and noising, see
            :meth:`peer.training.dpsgd.PoissonTrainer.run`.
        loss: the task's per-example loss (:mod:`peer.training.losses`); binary by default.

    Returns:
        ``(delta, n_examples, steps_taken)``: the float32 weight change (new - old), the
        number of local training examples, and the number of steps run.
    """
    features = np.asarray(x, dtype=np.float32)
    labels = np.asarray(y, dtype=np.float32).reshape(-1)
    n = features.shape[0]
    if n == 0:
        raise ValueError("no local training examples")
    if (sampling_rate is None) == (batch_size is None):
        raise ValueError("give exactly one of sampling_rate and batch_size")
    q = sampling_rate if sampling_rate is not None else min(1.0, float(batch_size or 0) / n)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    n_steps = steps if steps is not None else math.ceil(float(epochs or 0) / q)
    generator = rng if rng is not None else secure_generator()
    before = get_flat_weights(model)
    trainer_for(model, loss).run(
        features,
        labels,
        steps=n_steps,
        sampling_rate=q,
        lr=lr,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        generator=generator,
        prox_mu=prox_mu,
    )
    return get_flat_weights(model) - before, n, n_steps


def model_outputs(model: keras.Model, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The model's last-layer outputs for every row of ``x``, shape ``(n, outputs)``,
    computed in bounded batches (a large test split does not become one giant tensor)."""
    features = np.asarray(x, dtype=np.float32)
    n = features.shape[0]
    # An empty split still runs one (empty) batch, so the result has the model's width.
    parts = [
        np.asarray(model(features[i : i + _EVAL_BATCH], training=False), dtype=np.float64)
        for i in range(0, max(n, 1), _EVAL_BATCH)
    ]
    outputs = np.concatenate(parts)
    return outputs.reshape(n, outputs.shape[-1] if outputs.ndim > 1 else 1)


def predict_proba(model: keras.Model, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Predicted probability of the positive class for each row of ``x``."""
    logits = model_outputs(model, x).reshape(-1)
    return 1.0 / (1.0 + np.exp(-logits))


def evaluate_sums(
    model: keras.Model,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    n_bins: int = 20,
    loss_bound: float = math.inf,
) -> npt.NDArray[np.float64]:
    """Evaluation sums of ``model`` on ``(x, y)`` (layout in the module docstring).

    Each example's loss is clipped to ``loss_bound``, so one example moves the loss sum by
    at most that much (the sensitivity a DP release of the sums is calibrated to).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, not {n_bins}")
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    features = np.asarray(x, dtype=np.float32)
    if features.shape[0] == 0:
        return np.zeros(len(EVAL_HEADER) + 2 * n_bins)
    logits = model_outputs(model, features).reshape(-1)
    # Numerically stable binary cross-entropy from logits.
    losses = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    losses = np.minimum(losses, loss_bound)
    scores = 1.0 / (1.0 + np.exp(-logits))
    predicted = (scores >= 0.5).astype(np.int64)
    positive = labels == 1
    tp = np.sum(positive & (predicted == 1))
    fn = np.sum(positive & (predicted == 0))
    fp = np.sum(~positive & (predicted == 1))
    tn = np.sum(~positive & (predicted == 0))
    bins = np.minimum((scores * n_bins).astype(np.int64), n_bins - 1)
    pos_hist = np.bincount(bins[positive], minlength=n_bins)
    neg_hist = np.bincount(bins[~positive], minlength=n_bins)
    head = [losses.sum(), tp + tn, tp, fp, tn, fn, labels.shape[0]]
    return np.concatenate([np.asarray(head, dtype=np.float64), pos_hist, neg_hist]).astype(
        np.float64
    )


def metrics_from_sums(vector: npt.ArrayLike) -> dict[str, float]:
    """Accuracy, mean loss, AUC, sensitivity, specificity (and n) from evaluation sums.

    Undefined ratios (no examples, no positives, ...) are NaN. The AUC is the probability
    that a random positive scores in a higher bin than a random negative, plus one half of
    the probability that they share a bin.
    """
    v = np.asarray(vector, dtype=np.float64)
    head = len(EVAL_HEADER)
    if v.ndim != 1 or v.shape[0] < head + 2 or (v.shape[0] - head) % 2:
        raise ValueError(f"not an evaluation-sums vector: shape {v.shape}")
    loss_sum, correct, tp, fp, tn, fn, n = (float(value) for value in v[:head])
    n_bins = (v.shape[0] - head) // 2
    pos = v[head : head + n_bins]
    neg = v[head + n_bins :]
    return {
        "n": n,
        "accuracy": correct / n if n else math.nan,
        "loss": loss_sum / n if n else math.nan,
        "auc": histogram_auc(pos, neg),
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
    }


def histogram_auc(positive: npt.ArrayLike, negative: npt.ArrayLike) -> float:
    """The AUC from score histograms of the positives and negatives (equal bins, ascending).

    The probability that a random positive scores in a higher bin than a random negative,
    plus one half of the probability that they share a bin; NaN without positives or
    negatives.
    """
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if not (n_pos > 0 and n_neg > 0):
        return math.nan
    negatives_below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))
    return float(np.sum(pos * (negatives_below + 0.5 * neg)) / (n_pos * n_neg))


def update_bound(
    clip: float,
    sigma: float,
    lr: float,
    steps: int,
    *,
    n_examples: int,
    sampling_rate: float,
    n_coordinates: int,
    failure_probability: float = 1e-12,
) -> float:
    """A per-coordinate bound ``B`` with ``|delta_j| <= B`` for all j, except with tiny probability.

    One DP-SGD step changes a weight by ``lr * (s_j + z_j) / (q N)`` where ``s`` is the sum of
    the clipped per-example gradients (``|s_j| <= ||s|| <= |batch| * C``) and
    ``z_j ~ N(0, (sigma C)^2)``. Over ``T`` steps:

    - the clipped part is at most ``lr * C * S / (q N)`` with ``S`` the total of the Poisson
      batch sizes, ``S ~ Binomial(T N, q)``, bounded by the Chernoff bound
      ``S <= mu + (L + sqrt(L^2 + 8 mu L)) / 2`` with ``mu = q T N`` and
      ``L = ln(2 / failure_probability)``: about ``lr * C * T`` (``lr * C`` per step);
    - the noise part is Gaussian with standard deviation ``lr * sigma * C * sqrt(T) / (q N)``,
      bounded by ``k`` standard deviations with ``k = sqrt(2 ln(4 d / failure_probability))``
      so that all ``d`` coordinates are within it (union bound).

    The bound is loose for the clipped part (gradients rarely align across steps) but never
    wrong. Clamping a delta to ``[-B, B]`` before quantization is post-processing of a
    DP output and costs no privacy. For a count-weighted update (``delta * n``) multiply
    ``B`` by ``n``.

    Raises:
        ValueError: on a non-positive parameter.
    """
    if not (clip > 0 and lr > 0 and sigma >= 0 and steps >= 0 and n_examples > 0):
        raise ValueError("clip, lr and n_examples must be positive; sigma, steps >= 0")
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], not {sampling_rate}")
    if not 0.0 < failure_probability < 1.0 or n_coordinates < 1:
        raise ValueError("failure_probability must be in (0, 1) and n_coordinates >= 1")
    denom = sampling_rate * n_examples
    log_term = math.log(2.0 / failure_probability)
    mu = sampling_rate * steps * n_examples
    batch_total = mu + (log_term + math.sqrt(log_term**2 + 8.0 * mu * log_term)) / 2.0
    clipped_part = lr * clip * batch_total / denom
    k = math.sqrt(2.0 * math.log(4.0 * n_coordinates / failure_probability))
    noise_part = k * lr * sigma * clip * math.sqrt(steps) / denom
    return clipped_part + noise_part
