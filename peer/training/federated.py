"""Federated averaging in one process, with the summation injected.

``aggregate`` receives one vector per hospital and must return their sum. Here it is a plain
numpy sum; in the peer it is secure aggregation, which reveals only that sum. Each
hospital's vector is ``[delta * n_examples, n_examples]``, so the new global model is the
example-weighted mean of the local models: ``w + sum(delta_h * n_h) / sum(n_h)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .local import local_train
from .model import set_flat_weights

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = [
    "FedAvgResult",
    "LocalTrainConfig",
    "PeerData",
    "fedavg_round",
    "fedavg_step",
    "mean_update",
    "numpy_sum",
]

Vector = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class LocalTrainConfig:
    """How every hospital trains locally in a round (part of the session proposal)."""

    steps: int
    sampling_rate: float
    lr: float
    clip_norm: float | None
    noise_multiplier: float


@dataclass(slots=True)
class PeerData:
    """One hospital's training data, model replica and private noise generator."""

    name: str
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    model: keras.Model
    generator: tf.random.Generator


@dataclass(frozen=True, slots=True)
class FedAvgResult:
    """The outcome of one round."""

    weights: npt.NDArray[np.float32]
    total_examples: int
    steps: dict[str, int]


def numpy_sum(vectors: Sequence[Vector]) -> Vector:
    """The trivial (insecure) aggregator: ``sum(vectors)``."""
    total: Vector = np.sum(np.stack(vectors), axis=0)
    return total


def mean_update(weighted_sum: npt.ArrayLike, weight: float, bound: float | None = None) -> Vector:
    """The average update ``sum(w_h delta_h) / sum(w_h)`` in float64, the pseudo-gradient
    every server optimizer starts from (:mod:`peer.training.server_optim`).

    ``weighted_sum`` is the sum of every survivor's update times its weight and ``weight``
    the sum of the weights. With ``bound``, the update is clamped to ``[-bound, bound]`` per
    coordinate, so that no contribution, however malformed, moves a weight further.
    """
    step = np.asarray(weighted_sum, dtype=np.float64) / weight
    if bound is not None:
        step = np.clip(step, -bound, bound)
    return step


def fedavg_step(
    base: npt.ArrayLike, weighted_sum: npt.ArrayLike, weight: float, bound: float | None = None
) -> Vector:
    """The FedAvg rule: ``base + mean_update(weighted_sum, weight, bound)``, in float64."""
    new: Vector = np.asarray(base, dtype=np.float64) + mean_update(weighted_sum, weight, bound)
    return new


def fedavg_round(
    global_weights: npt.ArrayLike,
    peers_data: Sequence[PeerData],
    aggregate: Callable[[list[Vector]], Vector] = numpy_sum,
    *,
    config: LocalTrainConfig,
) -> FedAvgResult:
    """One round: every hospital trains from ``global_weights``; the weighted mean is kept.

    Raises:
        ValueError: ``aggregate`` returned a vector of the wrong shape or a zero count.
    """
    start = np.asarray(global_weights, dtype=np.float32)
    vectors: list[Vector] = []
    steps: dict[str, int] = {}
    for peer in peers_data:
        set_flat_weights(peer.model, start)
        delta, n, taken = local_train(
            peer.model,
            peer.x,
            peer.y,
            steps=config.steps,
            sampling_rate=config.sampling_rate,
            lr=config.lr,
            clip_norm=config.clip_norm,
            noise_multiplier=config.noise_multiplier,
            rng=peer.generator,
        )
        vectors.append(np.concatenate([delta.astype(np.float64) * n, [float(n)]]))
        steps[peer.name] = taken
    total = np.asarray(aggregate(vectors), dtype=np.float64)
    if total.shape != (start.size + 1,):
        raise ValueError(f"aggregate returned shape {total.shape}, expected ({start.size + 1},)")
    count = total[-1]
    if not count > 0:
        raise ValueError(f"aggregated example count is {count}")
    new = fedavg_step(start, total[:-1], count).astype(np.float32)
    return FedAvgResult(new, round(count), steps)
