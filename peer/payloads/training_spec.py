"""The parameters of a training session (its payload), checked before anything runs.

Split out of :mod:`peer.payloads.training` (the round logic). The payload keys are listed in
that module's docstring; the model and data keys are explained in
:mod:`peer.payloads.training_inputs`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from ..session import ProposalError
from ..training.accounting import PrivacyEvent
from ..training.server_optim import OPTIMIZER_KEYS, ServerOptimizer
from .evaluation import Task, TaskEvaluation, task_evaluation
from .training_inputs import (
    MODELS,
    SITE_ONLY_KEYS,
    ImageInput,
    count_parameters,
    declared_input_shape,
    model_json_of,
)

__all__ = ["EVAL_HEAD", "EVAL_SENSITIVITY", "TRAINING_BITS", "RoundKind", "TrainingSpec"]

Vector = npt.NDArray[np.float64]
EVAL_HEAD = 7  # loss_sum, correct, TP, FP, TN, FN, n (peer.training.EVAL_HEADER)
# L2 sensitivity of one test record's evaluation contribution (normalized loss, one
# confusion cell, one histogram cell).
EVAL_SENSITIVITY = math.sqrt(3.0)
# Training updates need the headroom of the 64-bit ring (peer.payloads.ring_bits_for).
TRAINING_BITS = 64


class RoundKind(StrEnum):
    STANDARDIZE = "standardize"
    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class TrainingSpec:
    """The training parameters of a session (see the module docstring)."""

    model: str
    training_rounds: int
    input_dim: int = 0  # tabular: features; images: 0 (the shape is image.size, channels)
    hidden: tuple[int, ...] = (64, 32)
    filters: tuple[int, ...] = (8, 16)  # the cnn preset's Conv2D widths
    model_json: str | None = None  # model = "declared": the JSON keras' to_json() writes
    image: ImageInput | None = None  # an imaging session's declared preprocessing
    local_steps: int = 50
    batch_size: int = 64
    lr: float = 0.5
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    max_records: int = 100_000
    feature_bound: float | tuple[float, ...] = 1e4
    loss_bound: float = 50.0
    histogram_bins: int = 20
    standardize_noise: float = 8.0
    eval_noise: float = 5.0
    weights: Mapping[str, float] | None = None
    # Server optimizer (peer.training.server_optim; None: its default) and FedProx.
    optimizer: str = "fedavg"
    server_lr: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None
    prox_mu: float = 0.0
    # The task (peer.payloads.evaluation): binary, multiclass (classes) or regression.
    task: str = "binary"
    classes: int = 2
    target_bound: float | None = None
    residual_bound: float | None = None
    target_center: float | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> TrainingSpec:
        known = {f for f in cls.__dataclass_fields__}
        site_only = sorted(set(payload) & set(SITE_ONLY_KEYS))
        if site_only:
            raise ProposalError(
                f"training payload: {', '.join(site_only)} refused: a proposal never says "
                "what a site reads; each site names its own source in its [data] table"
            )
        unknown = sorted(set(payload) - known - {"kind"})
        if unknown:
            raise ProposalError(f"unknown training payload keys: {', '.join(unknown)}")
        try:
            values = {k: v for k, v in payload.items() if k in known}
            for key in ("hidden", "filters"):
                if key in values:
                    values[key] = tuple(int(w) for w in values[key])
            if isinstance(values.get("model_json"), Mapping):
                values["model_json"] = json.dumps(values["model_json"], sort_keys=True)
            if "image" in values:
                values["image"] = ImageInput.from_payload(values["image"])
            if values.get("model") == "declared" and "image" not in values:
                shape = declared_input_shape(str(values.get("model_json")))
                if len(shape) != 1:
                    raise ProposalError(
                        f"training payload: model_json takes inputs of shape {shape}: declare "
                        "image = { size = [h, w], channels = c } for an imaging session"
                    )
                values.setdefault("input_dim", shape[0])
            if isinstance(values.get("feature_bound"), list | tuple):
                values["feature_bound"] = tuple(float(b) for b in values["feature_bound"])
            if "weights" in values:
                if not isinstance(values["weights"], Mapping):
                    raise TypeError("'weights' must map each participant to its weight")
                values["weights"] = {str(k): float(v) for k, v in values["weights"].items()}
            mu = values.get("prox_mu", 0.0)
            if isinstance(mu, bool) or not isinstance(mu, int | float):
                raise TypeError(f"prox_mu must be a number, not {mu!r}")
            spec = cls(**values)
        except ProposalError:
            raise  # already says what is wrong
        except (TypeError, ValueError) as error:
            raise ProposalError(f"training payload: {error}") from None
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ProposalError(f"model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if (self.model_json is not None) != (self.model == "declared"):
            raise ProposalError("training payload: model_json goes with model = 'declared'")
        bounds = self.feature_bounds() if self.input_dim >= 0 else np.ones(1)
        weights = list((self.weights or {}).values())
        checks = {
            "input_dim": self.input_dim >= 1 if self.image is None else self.input_dim == 0,
            "training_rounds": self.training_rounds >= 1,
            "local_steps": self.local_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "clip_norm": self.clip_norm > 0,
            "noise_multiplier": self.noise_multiplier >= 0,
            "delta": 0 < self.delta < 1,
            "max_records": self.max_records >= 1,
            "feature_bound": bool(np.all(np.isfinite(bounds) & (bounds > 0))),
            "loss_bound": self.loss_bound > 0,
            "histogram_bins": self.histogram_bins >= 2,
            "standardize_noise": self.standardize_noise > 0,
            "eval_noise": self.eval_noise > 0,
            "weights (each in (0, 1])": all(0 < w <= 1 for w in weights),
            "task": self.task in tuple(Task),
            "classes": self.classes >= 2 and (self.task == Task.MULTICLASS or self.classes == 2),
            "target_bound": (self.target_bound is not None and 0 < self.target_bound < math.inf)
            == (self.task == Task.REGRESSION),
            "residual_bound": self.residual_bound is None
            or (self.task == Task.REGRESSION and 0 < self.residual_bound < math.inf),
            "target_center": self.target_center is None
            or (self.task == Task.REGRESSION and math.isfinite(self.target_center)),
        }
        checks["prox_mu (>= 0, finite)"] = math.isfinite(self.prox_mu) and self.prox_mu >= 0
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ProposalError(f"training payload: invalid {', '.join(bad)}")
        self.server_optimizer()
        if self.model == "declared":
            declared = declared_input_shape(self.declared_json)
            if declared != self.input_shape:
                raise ProposalError(
                    f"training payload: model_json takes inputs of shape {declared}, the "
                    f"session's data has shape {self.input_shape} (input_dim or image)"
                )
        self.n_parameters()  # the model must be one this project can train

    def server_optimizer(self) -> ServerOptimizer:
        """The declared server optimizer (FedAvg by default).

        Raises:
            ProposalError: an unknown optimizer or a parameter out of range, named.
        """
        declared = {k: getattr(self, k) for k in OPTIMIZER_KEYS if getattr(self, k) is not None}
        try:
            return ServerOptimizer.from_payload(declared)
        except ValueError as error:
            raise ProposalError(f"training payload: {error}") from None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One record's input: ``(input_dim,)`` or the declared image's (h, w, channels)."""
        return self.image.shape if self.image is not None else (self.input_dim,)

    @property
    def standardized_dim(self) -> int:
        """Features whose mean and deviation round 1 releases (none for images)."""
        return 0 if self.image is not None else self.input_dim

    @cached_property
    def declared_json(self) -> str:
        """The session's model as declared-model JSON (a preset's is generated)."""
        return model_json_of(
            self.model,
            self.input_shape,
            self.hidden,
            self.filters,
            self.model_json,
            outputs=self.evaluation().outputs,
        )

    def feature_bounds(self) -> Vector:
        """The public bound ``B_j`` of each feature (|x_j| is clipped to it)."""
        if isinstance(self.feature_bound, tuple):
            if len(self.feature_bound) != self.standardized_dim:
                raise ProposalError(
                    f"training payload: feature_bound has {len(self.feature_bound)} values "
                    f"for {self.standardized_dim} features"
                )
            return np.asarray(self.feature_bound, dtype=np.float64)
        return np.full(self.standardized_dim, float(self.feature_bound))

    def weight(self, peer: str) -> float:
        """The public weight of ``peer``'s update (1 when the proposal names none)."""
        return 1.0 if self.weights is None else float(self.weights[peer])

    @property
    def rounds(self) -> int:
        """Session rounds: standardization, the training rounds, a final evaluation."""
        return self.training_rounds + 2

    def round_events(self, round_: int, sampling_rate: float) -> list[PrivacyEvent]:
        """The DP mechanisms a site releases in ``round_``, with its Poisson sampling rate
        ``batch_size / its training records``."""
        from ..training.accounting import gaussian_event, poisson_gaussian_event

        kind = self.kind_of(round_)
        if kind is RoundKind.STANDARDIZE:
            return [gaussian_event(self.standardize_noise)]
        events = [gaussian_event(self.eval_noise)]
        if kind is RoundKind.TRAIN:
            events.append(
                poisson_gaussian_event(sampling_rate, self.noise_multiplier, self.local_steps)
            )
        return events

    def session_epsilon(self, n_train: int) -> float:
        """The epsilon (PLD, at the global delta) this session alone costs a site with
        ``n_train`` training records: what ``ceremony run --dry-run`` shows."""
        from ..training.accounting import GLOBAL_DELTA, composed_epsilon

        if self.noise_multiplier == 0:
            return math.inf
        q = min(1.0, self.batch_size / max(1, n_train))
        events = [e for r in range(1, self.rounds + 1) for e in self.round_events(r, q)]
        return composed_epsilon(events, GLOBAL_DELTA)

    def kind_of(self, round_: int) -> RoundKind:
        if round_ == 1:
            return RoundKind.STANDARDIZE
        if round_ <= self.training_rounds + 1:
            return RoundKind.TRAIN
        return RoundKind.EVALUATE

    def n_parameters(self) -> int:
        return self._n_parameters

    @cached_property
    def _n_parameters(self) -> int:
        if self.model in ("logreg", "mlp") and self.image is None:
            from ..training import ModelSpec  # no Keras needed for the Dense presets

            return ModelSpec(
                self.model,  # type: ignore[arg-type]
                self.input_dim,
                self.hidden,
                outputs=self.evaluation().outputs,
            ).n_parameters()
        return count_parameters(self.declared_json)

    def evaluation(self) -> TaskEvaluation:
        """How this session's task is evaluated and released (peer.payloads.evaluation)."""
        return task_evaluation(
            self.task,
            histogram_bins=self.histogram_bins,
            loss_bound=self.loss_bound,
            classes=self.classes,
            target_bound=self.target_bound,
            residual_bound=self.residual_bound,
            target_center=self.target_center,
        )

    def eval_length(self) -> int:
        return self.evaluation().length()

    def standardize_std(self) -> float:
        """Noise standard deviation on each normalized standardization sum."""
        return self.standardize_noise * math.sqrt(1 + 2 * self.standardized_dim)

    def eval_std(self) -> float:
        """Noise standard deviation on each released evaluation sum."""
        return self.eval_noise * self.evaluation().sensitivity

    def update_bound(self) -> float:
        """Per-coordinate bound of a local model change, the same at every hospital.

        With Poisson sampling at q = batch_size / N the expected batch q N is batch_size for
        every N, so the bound of peer.training.update_bound does not depend on the local N.
        """
        from ..training import update_bound

        q = min(1.0, self.batch_size / self.max_records)
        return float(
            update_bound(
                self.clip_norm,
                self.noise_multiplier,
                self.lr,
                self.local_steps,
                n_examples=self.max_records,
                sampling_rate=q,
                n_coordinates=self.n_parameters(),
            )
        )
