"""Distributed discrete noise in the ring: DP-FedSGD with Skellam noise shares.

Theory of operation
-------------------
In the local-DP mode (peer/payloads/training.py) each hospital adds *all* the noise its release
needs, so the aggregate carries the noise of every hospital: ``H`` times the variance the
privacy of one record requires. With secure aggregation nobody sees one hospital's vector,
only the sum, so the noise can be *shared*: each hospital adds a part, and the sum over the
survivors carries the target. This module does that for one DP-SGD step per round
(DP-FedSGD):

1. each hospital Poisson-samples its records (rate ``q``), clips each example's gradient to
   L2 norm ``C`` and sums them: ``s_h``;
2. it scales by ``gamma`` and rounds stochastically to integers (unbiased), and adds a
   **Skellam** share ``Poisson(mu) - Poisson(mu)`` per coordinate: integer noise, so the
   ring sum is exact and no floating-point sampler is involved in the secret;
3. the integer vectors are summed (by secure aggregation; here by numpy), and every peer
   applies ``w -= lr * sum / (gamma * q * N)``.

Noise: the target is a Gaussian of standard deviation ``sigma * Delta`` on the integer sum,
with ``Delta = gamma * C + sqrt(d)`` the L2 sensitivity after rounding (rounding can lengthen
a vector by at most ``sqrt(d)``). Each of the ``honest_min`` hospitals whose shares must
cover it adds variance ``(sigma Delta)^2 / honest_min`` (Skellam variance ``2 mu``). With
``honest_min = H`` every hospital must add its share; a hospital that adds none (or a
colluder who subtracts its own) lowers the noise, which is why a real deployment sets
``honest_min = t - c`` (threshold minus tolerated colluders) and accepts the extra noise.

Accounting: each round is one Poisson-sampled mechanism on the sum; it is accounted as the
Gaussian of the same variance (``poisson_gaussian_event(q, sigma, 1)``). That is an
approximation: the Skellam mechanism's Rényi DP exceeds the Gaussian's by a term of order
``Delta / mu`` (Agarwal, Kairouz, Liu 2021), negligible at the ``mu`` used here (>= 1e5
``Delta``) but not zero. The secret randomness (sampling, rounding, Skellam shares) comes
from a NumPy PCG64 generator seeded per round with 256 bits of ``os.urandom``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .model import set_flat_weights

__all__ = ["DistributedNoise", "clipped_gradient_sum", "dp_fedsgd_round", "skellam_share"]

Vector = npt.NDArray[np.float64]


def secret_generator() -> np.random.Generator:
    """A generator for secret noise, seeded per use from the OS CSPRNG (256 bits)."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "big"))


def skellam_share(size: int, mu: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """``size`` independent Skellam(mu, mu) integers: ``Poisson(mu) - Poisson(mu)``."""
    if not mu > 0:
        raise ValueError(f"Skellam mu must be positive, not {mu}")
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


@dataclass(frozen=True, slots=True)
class DistributedNoise:
    """The public parameters of the shared noise (the same at every hospital).

    Attributes:
        sigma: noise multiplier of the *sum* (what the accountant sees).
        clip_norm: per-example L2 clip ``C``.
        gamma: fixed-point scale (integer units per unit of gradient).
        honest_min: hospitals whose shares together must carry the target noise.
    """

    sigma: float
    clip_norm: float
    gamma: float
    honest_min: int

    def sensitivity(self, dimension: int) -> float:
        return self.gamma * self.clip_norm + math.sqrt(dimension)

    def share_mu(self, dimension: int) -> float:
        """Skellam parameter of one hospital's share."""
        variance = (self.sigma * self.sensitivity(dimension)) ** 2
        return variance / (2 * self.honest_min)


def clipped_gradient_sum(model: object, x: npt.ArrayLike, y: npt.ArrayLike, clip: float) -> Vector:
    """``sum_i clip(grad_i, C)`` in the order of :func:`get_flat_weights` (no noise)."""
    from .dpsgd import trainer_for

    return trainer_for(model).clipped_sum(x, y, clip)


def _stochastic_round(values: Vector, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    low = np.floor(values)
    return (low + (rng.random(values.shape) < values - low)).astype(np.int64)


def dp_fedsgd_round(
    global_weights: npt.ArrayLike,
    sites: Sequence[tuple[object, npt.NDArray[np.float32], npt.NDArray[np.int64]]],
    *,
    sampling_rate: float,
    lr: float,
    noise: DistributedNoise,
    generator: Callable[[], np.random.Generator] = secret_generator,
) -> npt.NDArray[np.float32]:
    """One DP-FedSGD round; ``sites`` are ``(model, x, y)`` of each hospital.

    Returns the new global weights. The integer vectors summed here are what each hospital
    would quantize into the ring (they fit: the sum is far below 2^63).
    """
    start = np.asarray(global_weights, dtype=np.float32)
    d = start.size
    mu = noise.share_mu(d)
    total = np.zeros(d, dtype=np.int64)
    records = 0
    for model, x, y in sites:
        rng = generator()
        set_flat_weights(model, start)
        chosen = rng.random(len(y)) < sampling_rate
        if chosen.any():
            summed = clipped_gradient_sum(model, x[chosen], y[chosen], noise.clip_norm)
        else:
            summed = np.zeros(d)
        share = _stochastic_round(summed * noise.gamma, rng) + skellam_share(d, mu, rng)
        total += share
        records += len(y)
    gradient = total.astype(np.float64) / (noise.gamma * sampling_rate * records)
    return (start.astype(np.float64) - lr * gradient).astype(np.float32)
