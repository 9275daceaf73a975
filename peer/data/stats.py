"""Federated standardization: local sums here, the summing itself in secure aggregation.

Each hospital computes ``local_feature_stats(X)``, a single float64 vector
``[count, sum_1..sum_d, sumsq_1..sumsq_d]``. These vectors are *summed* across hospitals by
secure aggregation (so no hospital's own sums are revealed, only the consortium's), and every
peer then derives the same mean and standard deviation with :func:`global_standardizer`.

The sums are exact statistics of patient data, not differentially private: releasing the
aggregate reveals the consortium-wide mean and variance of each feature. That is usually
acceptable for standardization; where it is not, noise can be added to each local vector
before aggregation (e.g. with diffprivlib) at a privacy cost that must then be accounted.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["global_standardizer", "local_feature_stats", "standardize"]


def local_feature_stats(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``[n, sum(x, axis=0), sum(x**2, axis=0)]`` as one float64 vector of length ``1 + 2d``."""
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"features must be a 2-d array, not shape {data.shape}")
    return np.concatenate(([float(data.shape[0])], data.sum(axis=0), np.square(data).sum(axis=0)))


def global_standardizer(
    aggregated: npt.ArrayLike, d: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean and standard deviation from a sum of :func:`local_feature_stats` vectors.

    The variance is the population variance ``E[x^2] - E[x]^2`` (float64 is ample for
    clinical features; a negative value from round-off is clamped to 0). Constant features
    get a standard deviation of 1 so that standardizing never divides by zero.

    Raises:
        ValueError: the vector does not have length ``1 + 2d`` or its count is not positive.
    """
    vector = np.asarray(aggregated, dtype=np.float64)
    if vector.shape != (1 + 2 * d,):
        raise ValueError(f"expected a vector of length {1 + 2 * d}, got shape {vector.shape}")
    n = vector[0]
    if not n > 0:
        raise ValueError(f"aggregated count must be positive, not {n}")
    mean = vector[1 : 1 + d] / n
    var = np.maximum(vector[1 + d :] / n - np.square(mean), 0.0)
    std = np.sqrt(var)
    std[std <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, std


def standardize(
    x: npt.ArrayLike, mean: npt.ArrayLike, std: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """``(x - mean) / std`` as float32, ready for training."""
    out: npt.NDArray[np.float64] = (np.asarray(x, dtype=np.float64) - np.asarray(mean)) / (
        np.asarray(std, dtype=np.float64)
    )
    return out.astype(np.float32)
