"""What a training session agrees on about its model, per task: binary, multi-class, regression.

Theory of operation. A hospital never publishes a metric. It computes *statistics* of its test
split that add up across hospitals (counts, sums, histograms), scales each coordinate by the
public bound of what one record can contribute to it, and releases the vector with Gaussian
noise through the one release path of the training payload
(:func:`peer.payloads.training.released_evaluation`: the charge is written before the vector
leaves, see that module). The secure sum of the releases is the only input of the agreed
metrics: :meth:`TaskEvaluation.from_release` post-processes it (clamping noisy counts, deriving
withheld coordinates) and :meth:`TaskEvaluation.agreed_metrics` turns it into the metrics
stored in the agreed record. No hospital's own figures enter anywhere.

Each task declares, per coordinate of its vector, the ``scale`` (the largest value one record
adds to it) and the coordinates that are ``withheld`` (derived from others after the sum, so
not released at all); the L2 ``sensitivity`` of one record's scaled contribution over the
released coordinates calibrates the noise (``eval_noise * sensitivity``).

Layouts (``B`` = ``histogram_bins``):

- **binary** (:data:`peer.training.EVAL_HEADER`): ``[loss, correct, TP, FP, TN, FN, n,
  positives' score histogram (B), negatives' score histogram (B)]``; ``correct`` and ``n``
  withheld; one record moves the loss (<= 1 once scaled), one confusion cell and one histogram
  cell: sensitivity ``sqrt(3)``.
- **multiclass** (``K`` classes): ``[loss, confusion matrix (K x K, row = true class, column =
  predicted), then for each class c: the histogram of p_c over the records of class c (B) and
  over the others (B)]``; one record moves the loss, one confusion cell and one cell of each of
  the K one-vs-rest histograms: sensitivity ``sqrt(K + 2)``.
- **regression** (targets centred on the public ``target_center`` ``c`` and clipped to
  ``[-Y, Y]`` around it, residuals ``prediction - target`` clipped to ``[-R, R]``,
  ``Y = target_bound`` and ``R = residual_bound`` public in the proposal), with ``y`` the
  centred target: ``[sum y, sum y^2, sum r^2, sum |r|, n, residual histogram over [-R, R]
  (B)]``, scaled by
  ``[Y, Y^2, R^2, R, 1, 1...]``; ``n`` withheld (the histogram's total); one record moves four
  scaled sums by at most 1 each and one histogram cell: sensitivity ``sqrt(5)``.

Metric names are a contract with the dashboard (:mod:`dashboard.data`) and the audit report:
binary ``accuracy, loss, auc, sensitivity, specificity, score_histogram``; multiclass
``accuracy, loss, macro_f1, auc_ovr, confusion_matrix``; regression ``mae, rmse, r2,
residual_histogram``; every task also ``n``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..training import (
    EVAL_HEADER,
    Loss,
    binary_logit_loss,
    evaluate_sums,
    histogram_auc,
    metrics_from_sums,
    model_outputs,
    softmax_loss,
    squared_loss,
)

if TYPE_CHECKING:
    import keras

__all__ = [
    "BinaryEvaluation",
    "MulticlassEvaluation",
    "RegressionEvaluation",
    "Task",
    "TaskEvaluation",
    "multiclass_sums",
    "regression_sums",
    "task_evaluation",
]

Vector = npt.NDArray[np.float64]


class Task(StrEnum):
    BINARY = "binary"
    MULTICLASS = "multiclass"
    REGRESSION = "regression"


def _finite_or_none(value: float) -> float | None:
    """Undefined metrics (NaN) are stored as null: the ledger's canonical JSON has no NaN."""
    return value if math.isfinite(value) else None


def _cells(values: npt.ArrayLike) -> list[float]:
    """Released (noisy, post-processed) counts as published: rounded, never negative."""
    return [round(max(float(c), 0.0), 3) for c in np.asarray(values, dtype=np.float64).ravel()]


def _unbiased_count(noisy_cells: npt.ArrayLike) -> float:
    """A released count: the sum of its noisy cells *before* each is clamped at 0.

    Clamping first adds the positive part of every near-empty cell's noise (about 0.4 σ
    per empty cell), which inflated n (regression: 95-109 for 88 test records at
    eval_noise 1; an empty off-diagonal confusion cell likewise) and biased every ratio
    over n. The unclamped sum is unbiased; what readers see of the cells is still clamped.
    A count that rounds to 0 is 0: no ratio is given over it (it showed n = 0 beside
    finite figures).
    """
    count = float(np.sum(noisy_cells))
    return count if count > 0.5 else 0.0  # round(0.5) is 0 too


def _describe_bad(labels: npt.NDArray[Any], bad: npt.NDArray[np.bool_]) -> str:
    shown = sorted({str(v) for v in labels[bad].tolist()})[:5]
    return f"{int(bad.sum())} record(s), values {', '.join(shown)}"


@dataclass(frozen=True)
class TaskEvaluation(ABC):
    """How one task's test-set statistics are computed, released and turned into metrics."""

    histogram_bins: int
    loss_bound: float

    task: Task = Task.BINARY  # overridden by each subclass

    @property
    @abstractmethod
    def loss(self) -> Loss:
        """The per-example training loss (:mod:`peer.training.losses`)."""

    @property
    def outputs(self) -> int:
        """Width of the model's last layer."""
        return 1

    @abstractmethod
    def length(self) -> int:
        """Length of the evaluation vector."""

    @abstractmethod
    def scale(self) -> Vector:
        """Per coordinate, the most one record adds to it (the release divides by it)."""

    def withheld(self) -> tuple[int, ...]:
        """Coordinates not released (derived from the others after the sum)."""
        return ()

    @property
    @abstractmethod
    def sensitivity(self) -> float:
        """L2 norm of one record's scaled contribution over the released coordinates."""

    def labels_column(self) -> str:
        """The data column the task's training targets come from (named in errors)."""
        return "label"

    @abstractmethod
    def check_labels(self, labels: npt.NDArray[Any], who: str) -> None:
        """Raise ValueError naming ``who`` and the column if a label does not fit the task."""

    def training_targets(self, labels: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """The labels as the trainer takes them (float32)."""
        return np.asarray(labels, dtype=np.float32)

    @abstractmethod
    def local_sums(self, model: keras.Model, x: npt.ArrayLike, y: npt.ArrayLike) -> Vector:
        """This hospital's statistics of ``model`` on its test split (unscaled, no noise)."""

    @abstractmethod
    def from_release(self, total: Vector) -> Vector:
        """The statistics (unscaled) from the sum of the releases: post-processing only."""

    @abstractmethod
    def agreed_metrics(self, statistics: Vector) -> dict[str, Any]:
        """The agreed metrics from :meth:`from_release`'s statistics (JSON-safe)."""


# ---------------------------------------------------------------------- binary


_BINARY_WITHHELD = (1, 6)  # correct = TP + TN, n = TP + FP + TN + FN


@dataclass(frozen=True)
class BinaryEvaluation(TaskEvaluation):
    task: Task = Task.BINARY

    @property
    def loss(self) -> Loss:
        return binary_logit_loss

    def length(self) -> int:
        return len(EVAL_HEADER) + 2 * self.histogram_bins

    def scale(self) -> Vector:
        scale = np.ones(self.length())
        scale[0] = self.loss_bound
        return scale

    def withheld(self) -> tuple[int, ...]:
        return _BINARY_WITHHELD

    @property
    def sensitivity(self) -> float:
        return math.sqrt(3.0)

    def check_labels(self, labels: npt.NDArray[Any], who: str) -> None:
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            raise ValueError(
                f"{who}'s column 'label' does not fit a binary session (0 or 1): "
                f"{_describe_bad(labels, bad)}"
            )

    def local_sums(self, model: keras.Model, x: npt.ArrayLike, y: npt.ArrayLike) -> Vector:
        return evaluate_sums(model, x, y, self.histogram_bins, loss_bound=self.loss_bound)

    def from_release(self, total: Vector) -> Vector:
        raw = np.array(total, dtype=np.float64)
        out = np.maximum(raw, 0.0)
        # n and the correct count from the cells before clamping (unbiased; see
        # _unbiased_count); sensitivity and specificity use the clamped cells.
        n = _unbiased_count(raw[2:6])
        out[1] = min(max(float(raw[2] + raw[4]), 0.0), n)
        out[6] = n
        out[0] = min(out[0] * self.loss_bound, n * self.loss_bound)
        return out

    def agreed_metrics(self, statistics: Vector) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            k: _finite_or_none(v) for k, v in metrics_from_sums(statistics).items()
        }
        metrics["n"] = round(metrics["n"] or 0)
        if metrics["n"] == 0:  # sensitivity and specificity come from the clamped cells
            metrics.update(sensitivity=None, specificity=None)
        # The score histograms are cells of the same noisy (charged) evaluation release, so
        # publishing them is post-processing: readers get ROC and calibration from agreed
        # numbers (dashboard, report) at no further privacy cost.
        bins = self.histogram_bins
        head = len(EVAL_HEADER)
        cells = _cells(statistics[head : head + 2 * bins])
        metrics["score_histogram"] = {"positive": cells[:bins], "negative": cells[bins:]}
        return metrics


# ---------------------------------------------------------------------- multi-class


def multiclass_sums(
    logits: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int, loss_bound: float
) -> Vector:
    """Multi-class evaluation statistics (layout in the module docstring) from ``K`` logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    n, k = z.shape
    # Stable log-softmax: one example's loss is clipped to loss_bound (its sensitivity).
    shifted = z - z.max(axis=1, keepdims=True) if n else z
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    losses = np.minimum(-log_probs[np.arange(n), y], loss_bound)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (y, np.argmax(z, axis=1) if n else y), 1.0)
    probs = np.exp(log_probs)
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    histograms = []
    for c in range(k):
        mine = y == c
        histograms.append(np.bincount(bins[mine, c], minlength=n_bins))
        histograms.append(np.bincount(bins[~mine, c], minlength=n_bins))
    return np.concatenate([[losses.sum()], confusion.ravel(), *histograms]).astype(np.float64)


@dataclass(frozen=True)
class MulticlassEvaluation(TaskEvaluation):
    classes: int = 3
    task: Task = Task.MULTICLASS

    @property
    def loss(self) -> Loss:
        return softmax_loss

    @property
    def outputs(self) -> int:
        return self.classes

    def length(self) -> int:
        return 1 + self.classes**2 + 2 * self.classes * self.histogram_bins

    def scale(self) -> Vector:
        scale = np.ones(self.length())
        scale[0] = self.loss_bound
        return scale

    @property
    def sensitivity(self) -> float:
        return math.sqrt(self.classes + 2.0)

    def check_labels(self, labels: npt.NDArray[Any], who: str) -> None:
        bad = (labels < 0) | (labels >= self.classes) | (labels != np.floor(labels))
        if bad.any():
            raise ValueError(
                f"{who}'s column 'label' does not fit a {self.classes}-class session "
                f"(class indices 0..{self.classes - 1}): {_describe_bad(labels, bad)}"
            )

    def local_sums(self, model: keras.Model, x: npt.ArrayLike, y: npt.ArrayLike) -> Vector:
        return multiclass_sums(model_outputs(model, x), y, self.histogram_bins, self.loss_bound)

    def _split(self, statistics: Vector) -> tuple[float, Vector, Vector]:
        k, b = self.classes, self.histogram_bins
        confusion = statistics[1 : 1 + k * k].reshape(k, k)
        histograms = statistics[1 + k * k :].reshape(k, 2, b)
        return float(statistics[0]), confusion, histograms

    def from_release(self, total: Vector) -> Vector:
        # The confusion cells stay as released (noisy, possibly negative): agreed_metrics
        # takes n and the correct count from them before clamping (_unbiased_count).
        raw = np.array(total, dtype=np.float64)
        out = np.maximum(raw, 0.0)
        k2 = self.classes**2
        out[1 : 1 + k2] = raw[1 : 1 + k2]
        out[0] = min(out[0] * self.loss_bound, _unbiased_count(raw[1 : 1 + k2]) * self.loss_bound)
        return out

    def agreed_metrics(self, statistics: Vector) -> dict[str, Any]:
        loss_sum, raw_confusion, histograms = self._split(statistics)
        n = _unbiased_count(raw_confusion)
        correct = min(max(float(np.trace(raw_confusion)), 0.0), n)
        confusion = np.maximum(raw_confusion, 0.0)  # shown, and the F1 counts
        tp = np.diag(confusion)
        # Per-class F1 = 2TP / (2TP + FP + FN); a class nobody has nor predicts is undefined
        # and left out of the macro average.
        denominators = confusion.sum(axis=0) + confusion.sum(axis=1)
        f1 = [2 * t / d for t, d in zip(tp, denominators, strict=True) if d > 0 and n]
        aucs = [histogram_auc(h[0], h[1]) for h in histograms]
        defined = [a for a in aucs if math.isfinite(a)]
        return {
            "n": round(n),
            "accuracy": _finite_or_none(correct / n if n else math.nan),
            "loss": _finite_or_none(loss_sum / n if n else math.nan),
            "macro_f1": _finite_or_none(float(np.mean(f1)) if f1 else math.nan),
            "auc_ovr": _finite_or_none(float(np.mean(defined)) if defined else math.nan),
            "confusion_matrix": [_cells(row) for row in confusion],
        }


# ---------------------------------------------------------------------- regression


def regression_sums(
    predictions: npt.ArrayLike,
    targets: npt.ArrayLike,
    n_bins: int,
    target_bound: float,
    residual_bound: float,
) -> Vector:
    """Regression statistics (layout in the module docstring) of *centred* predictions and
    targets, targets and residuals clipped to their public bounds (what makes one record's
    contribution bounded)."""
    y = np.clip(np.asarray(targets, dtype=np.float64).reshape(-1), -target_bound, target_bound)
    r = np.asarray(predictions, dtype=np.float64).reshape(-1) - y
    r = np.clip(r, -residual_bound, residual_bound)
    edges = np.linspace(-residual_bound, residual_bound, n_bins + 1)
    cells = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, n_bins - 1)
    histogram = np.bincount(cells, minlength=n_bins)
    head = [y.sum(), np.square(y).sum(), np.square(r).sum(), np.abs(r).sum(), len(y)]
    return np.concatenate([head, histogram]).astype(np.float64)


_REGRESSION_N = 4  # index of n in the regression layout (withheld: the histogram's total)


@dataclass(frozen=True)
class RegressionEvaluation(TaskEvaluation):
    target_bound: float = 1.0
    residual_bound: float = 2.0
    target_center: float = 0.0
    task: Task = Task.REGRESSION

    @property
    def loss(self) -> Loss:
        return squared_loss

    def length(self) -> int:
        return 5 + self.histogram_bins

    def scale(self) -> Vector:
        y, r = self.target_bound, self.residual_bound
        return np.concatenate(([y, y * y, r * r, r, 1.0], np.ones(self.histogram_bins)))

    def withheld(self) -> tuple[int, ...]:
        return (_REGRESSION_N,)

    @property
    def sensitivity(self) -> float:
        return math.sqrt(5.0)

    def labels_column(self) -> str:
        return "target"

    def check_labels(self, labels: npt.NDArray[Any], who: str) -> None:
        bad = ~np.isfinite(np.asarray(labels, dtype=np.float64))
        if bad.any():
            raise ValueError(
                f"{who}'s column 'target' has values that are not finite numbers: "
                f"{_describe_bad(labels, bad)}"
            )

    def training_targets(self, labels: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        # The model learns (y - c) / Y (within [-1, 1]): the same scale for every session
        # whatever the target's unit, so the DP-SGD clip norm and learning rate mean the same.
        bound = self.target_bound
        centred = np.asarray(labels, dtype=np.float64) - self.target_center
        scaled = np.clip(centred, -bound, bound) / bound
        return scaled.astype(np.float32)

    def local_sums(self, model: keras.Model, x: npt.ArrayLike, y: npt.ArrayLike) -> Vector:
        # Centred on c, so sum y^2 measures the spread around c rather than the target's
        # magnitude: its noise (scaled by Y^2) stays small against the variance R^2 needs.
        predictions = model_outputs(model, x).reshape(-1) * self.target_bound
        centred = np.asarray(y, dtype=np.float64).reshape(-1) - self.target_center
        return regression_sums(
            predictions, centred, self.histogram_bins, self.target_bound, self.residual_bound
        )

    def from_release(self, total: Vector) -> Vector:
        out = np.array(total, dtype=np.float64) * self.scale()
        # (BENCHMARKS.md, "Regression sessions: why a training round sometimes gets worse")
        n = _unbiased_count(out[5:])
        out[5:] = np.maximum(out[5:], 0.0)
        y, r = self.target_bound, self.residual_bound
        out[_REGRESSION_N] = n
        out[0] = np.clip(out[0], -n * y, n * y)
        out[1] = np.clip(out[1], 0.0, n * y * y)
        out[2] = np.clip(out[2], 0.0, n * r * r)
        out[3] = np.clip(out[3], 0.0, n * r)
        return out

    def agreed_metrics(self, statistics: Vector) -> dict[str, Any]:
        sum_y, sum_y2, sum_r2, sum_abs_r, n = (float(v) for v in statistics[:5])
        mse = sum_r2 / n if n else math.nan
        total_ss = sum_y2 - sum_y**2 / n if n else math.nan
        edges = np.linspace(-self.residual_bound, self.residual_bound, self.histogram_bins + 1)
        return {
            "n": round(n),
            "mae": _finite_or_none(sum_abs_r / n if n else math.nan),
            "rmse": _finite_or_none(math.sqrt(mse) if n else math.nan),
            "r2": _finite_or_none(1.0 - sum_r2 / total_ss if total_ss > 0 else math.nan),
            "residual_histogram": {
                "edges": [round(float(e), 6) for e in edges],
                "counts": _cells(statistics[5:]),
            },
        }


def task_evaluation(
    task: str,
    *,
    histogram_bins: int,
    loss_bound: float,
    classes: int = 2,
    target_bound: float | None = None,
    residual_bound: float | None = None,
    target_center: float | None = None,
) -> TaskEvaluation:
    """The evaluation of a session's ``task`` with its public parameters.

    Raises:
        ValueError: an unknown task, or a regression without ``target_bound``.
    """
    kind = Task(task)
    if kind is Task.MULTICLASS:
        return MulticlassEvaluation(histogram_bins, loss_bound, classes=classes)
    if kind is Task.REGRESSION:
        if target_bound is None:
            raise ValueError("a regression session must declare target_bound")
        return RegressionEvaluation(
            histogram_bins,
            loss_bound,
            target_bound=target_bound,
            residual_bound=residual_bound if residual_bound is not None else 2.0 * target_bound,
            target_center=target_center or 0.0,
        )
    return BinaryEvaluation(histogram_bins, loss_bound)
