"""Federated DP-SGD training as a round payload: what a hospital contributes and concludes.

A training session (payload kind ``"training"``) has ``training_rounds + 2`` rounds:

1. **standardize** — each hospital contributes ``[n, sum(x), sum(x^2)]`` of its training
   features; the agreed sum gives every peer the same global mean and standard deviation
   (stored in the round's agreed metrics), so no hospital standardizes with its own
   statistics only.
2. ... ``training_rounds + 1`` — **train**: each hospital evaluates the global model that
   enters the round on its test split, trains it locally with DP-SGD, and contributes
   ``[delta * n, n, evaluation sums]``. The agreed sum gives the new global model
   ``w + sum(delta_h n_h) / sum(n_h)`` and the global metrics of the entering model.
3. last — **evaluate**: the final model's evaluation sums only.

Only masked, quantized vectors leave a hospital. Every range used for quantization follows
from the session's public parameters (clip norm, learning rate, steps, the declared maximum
number of records), so it is the same at every peer and ``conclude`` is deterministic.

Proposal payload keys (all public, all in the signed proposal)::

    {"kind": "training", "model": "logreg" | "mlp", "hidden": [64, 32], "input_dim": 30,
     "training_rounds": 3, "local_steps": 50, "batch_size": 64, "lr": 0.5, "clip_norm": 1.0,
     "noise_multiplier": 1.0, "delta": 1e-5, "max_records": 100000, "feature_bound": 1e4,
     "loss_bound": 50.0, "histogram_bins": 20}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from secagg import Quantizer
from secagg.prg import WordArray

from .data import PatientStore, global_standardizer, local_feature_stats, standardize
from .ledger import Ledger
from .payload import LocalContribution, RoundResult
from .session import ProposalError, SessionProposal

if TYPE_CHECKING:
    import keras

    from .config import PeerConfig

__all__ = [
    "PrivacyBudgetError",
    "RoundKind",
    "TrainingPayload",
    "TrainingSpec",
    "training_payload",
]


class PrivacyBudgetError(ValueError):
    """A round would take this institution over its privacy budget; it refuses the round."""


Vector = npt.NDArray[np.float64]
EVAL_HEAD = 7  # loss_sum, correct, TP, FP, TN, FN, n (peer.training.EVAL_HEADER)


class RoundKind(StrEnum):
    STANDARDIZE = "standardize"
    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class TrainingSpec:
    """The training parameters of a session (see the module docstring)."""

    model: str
    input_dim: int
    training_rounds: int
    hidden: tuple[int, ...] = (64, 32)
    local_steps: int = 50
    batch_size: int = 64
    lr: float = 0.5
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    max_records: int = 100_000
    feature_bound: float = 1e4
    loss_bound: float = 50.0
    histogram_bins: int = 20

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> TrainingSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(payload) - known - {"kind"})
        if unknown:
            raise ProposalError(f"unknown training payload keys: {', '.join(unknown)}")
        try:
            values = {k: v for k, v in payload.items() if k in known}
            if "hidden" in values:
                values["hidden"] = tuple(int(w) for w in values["hidden"])
            spec = cls(**values)
        except TypeError as error:
            raise ProposalError(f"training payload: {error}") from None
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.model not in ("logreg", "mlp"):
            raise ProposalError(f"model must be 'logreg' or 'mlp', not {self.model!r}")
        checks = {
            "input_dim": self.input_dim >= 1,
            "training_rounds": self.training_rounds >= 1,
            "local_steps": self.local_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "clip_norm": self.clip_norm > 0,
            "noise_multiplier": self.noise_multiplier >= 0,
            "delta": 0 < self.delta < 1,
            "max_records": self.max_records >= 1,
            "feature_bound": self.feature_bound > 0,
            "loss_bound": self.loss_bound > 0,
            "histogram_bins": self.histogram_bins >= 2,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ProposalError(f"training payload: invalid {', '.join(bad)}")

    @property
    def rounds(self) -> int:
        """Session rounds: standardization, the training rounds, a final evaluation."""
        return self.training_rounds + 2

    def kind_of(self, round_: int) -> RoundKind:
        if round_ == 1:
            return RoundKind.STANDARDIZE
        if round_ <= self.training_rounds + 1:
            return RoundKind.TRAIN
        return RoundKind.EVALUATE

    def model_spec(self) -> Any:
        from .training import ModelSpec

        return ModelSpec(self.model, self.input_dim, self.hidden)  # type: ignore[arg-type]

    def n_parameters(self) -> int:
        return int(self.model_spec().n_parameters())

    def eval_length(self) -> int:
        return EVAL_HEAD + 2 * self.histogram_bins

    def update_bound(self) -> float:
        """Per-coordinate bound of a local model change, the same at every hospital.

        With Poisson sampling at q = batch_size / N the expected batch q N is batch_size for
        every N, so the bound of peer.training.update_bound does not depend on the local N.
        """
        from .training import update_bound

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


def _json_safe(values: Mapping[str, float]) -> dict[str, float | None]:
    """Undefined metrics (NaN) are stored as null: the ledger's canonical JSON has no NaN."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }


@dataclass
class TrainingPayload:
    """One hospital's side of a training session (the Payload protocol of peer/payload.py)."""

    proposal: SessionProposal
    spec: TrainingSpec
    me: str
    store: PatientStore
    ledger: Ledger
    max_epsilon: float = math.inf  # this institution's total budget (its local policy)
    rng: np.random.Generator = field(
        default_factory=lambda: np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
    )
    _model: Any = None
    _noise: Any = None
    _data: (
        tuple[
            npt.NDArray[np.float32],
            npt.NDArray[np.int64],
            npt.NDArray[np.float32],
            npt.NDArray[np.int64],
        ]
        | None
    ) = None

    # ---------------------------------------------------------------- layout and ranges

    def vector_length(self, round_: int) -> int:
        if self.spec.kind_of(round_) is RoundKind.STANDARDIZE:
            return 1 + 2 * self.spec.input_dim
        return self.spec.n_parameters() + 1 + self.spec.eval_length()

    def quantizer(self, round_: int) -> Quantizer:
        spec, cap = self.spec, float(self.spec.max_records)
        if spec.kind_of(round_) is RoundKind.STANDARDIZE:
            d = spec.input_dim
            bounds = np.concatenate(
                (
                    [cap],
                    np.full(d, spec.feature_bound * cap),
                    np.full(d, spec.feature_bound**2 * cap),
                )
            )
        else:
            eval_bounds = np.full(spec.eval_length(), cap)
            eval_bounds[0] = spec.loss_bound * cap
            bounds = np.concatenate(
                (
                    np.full(spec.n_parameters(), max(spec.update_bound(), 1e-6) * cap),
                    [cap],
                    eval_bounds,
                )
            )
        return Quantizer(bounds, len(self.proposal.participants), self.proposal.bits)

    # ---------------------------------------------------------------- local state

    def _local_data(self) -> tuple[Any, Any, Any, Any]:
        if self._data is None:
            x_train, y_train = self.store.load("train")
            x_test, y_test = self.store.load("test")
            if x_train.shape[1] != self.spec.input_dim:
                raise ValueError(
                    f"{self.me}'s data has {x_train.shape[1]} features; the session's model "
                    f"expects {self.spec.input_dim}"
                )
            if len(y_train) > self.spec.max_records:
                raise ValueError(
                    f"{self.me} has {len(y_train)} training records, more than the session's "
                    f"max_records {self.spec.max_records}"
                )
            self._data = (x_train, y_train, x_test, y_test)
        return self._data

    def _standardizer(self) -> tuple[Vector, Vector]:
        for stored in self.ledger.agreed_records(self.proposal.session_id):
            info = stored.record.metrics.get("standardization")
            if stored.record.round == 1 and isinstance(info, Mapping):
                return np.asarray(info["mean"], dtype=np.float64), np.asarray(
                    info["std"], dtype=np.float64
                )
        raise ValueError(
            "the standardization round (round 1) was not agreed; training cannot start"
        )

    def global_weights(self, before_round: int) -> npt.NDArray[np.float32]:
        """The agreed global model entering ``before_round`` (initial weights if none)."""
        latest = None
        for stored in self.ledger.agreed_records(self.proposal.session_id):
            if 2 <= stored.record.round < before_round:
                latest = stored.record.round
        if latest is not None:
            checkpoint = self.ledger.get_checkpoint(self.proposal.session_id, latest)
            if checkpoint is None:
                raise ValueError(f"the agreed model of round {latest} is missing from the ledger")
            return np.frombuffer(checkpoint.weights, dtype="<f4").astype(np.float32)
        from .training import build_model, get_flat_weights

        return get_flat_weights(build_model(self.spec.model_spec(), self.proposal.seed))

    def _keras_model(self) -> keras.Model:
        if self._model is None:
            from .training import build_model, secure_generator

            self._model = build_model(self.spec.model_spec(), self.proposal.seed)
            self._noise = secure_generator()
        return self._model

    def _trained_rounds(self) -> int:
        return sum(
            1
            for stored in self.ledger.agreed_records(self.proposal.session_id)
            if stored.record.epsilon.get(self.me, 0.0) > 0
        )

    def sampling_rate(self) -> float:
        x_train = self._local_data()[0]
        return min(1.0, self.spec.batch_size / max(1, len(x_train)))

    def epsilon_needed(self) -> float:
        """Epsilon this hospital spends over the whole session (PLD accountant)."""
        from .training import epsilon

        if self.spec.noise_multiplier == 0:
            return math.inf
        steps = self.spec.local_steps * self.spec.training_rounds
        return float(
            epsilon(self.sampling_rate(), self.spec.noise_multiplier, steps, self.spec.delta)
        )

    # ---------------------------------------------------------------- the Payload protocol

    def prepare(self, round_: int) -> LocalContribution:
        from .training import evaluate_sums, local_train, set_flat_weights

        kind = self.spec.kind_of(round_)
        x_train, y_train, x_test, y_test = self._local_data()
        epsilon_spent = 0.0
        delta = 0.0
        if kind is RoundKind.STANDARDIZE:
            vector = local_feature_stats(x_train)
        else:
            mean, std = self._standardizer()
            model = self._keras_model()
            set_flat_weights(model, self.global_weights(round_))
            evaluation = evaluate_sums(
                model, standardize(x_test, mean, std), y_test, self.spec.histogram_bins
            )
            update = np.zeros(self.spec.n_parameters())
            n = 0
            if kind is RoundKind.TRAIN:
                epsilon_spent, delta = self._charge()
                change, n, _ = local_train(
                    model,
                    standardize(x_train, mean, std),
                    y_train,
                    steps=self.spec.local_steps,
                    sampling_rate=self.sampling_rate(),
                    lr=self.spec.lr,
                    clip_norm=self.spec.clip_norm,
                    noise_multiplier=self.spec.noise_multiplier,
                    rng=self._noise,
                )
                update = change.astype(np.float64) * n
            vector = np.concatenate((update, [float(n)], evaluation))
        quantized = self.quantizer(round_).quantize(vector, self.rng)
        return LocalContribution(
            quantized.values,
            epsilon=epsilon_spent,
            delta=delta,
            clipped_fraction=quantized.clipped_fraction,
        )

    def _charge(self) -> tuple[float, float]:
        """Epsilon (and delta) of this round: the increase of the composed PLD epsilon."""
        from .training import epsilon

        q, sigma, steps = self.sampling_rate(), self.spec.noise_multiplier, self.spec.local_steps
        done = self._trained_rounds()
        before = epsilon(q, sigma, done * steps, self.spec.delta) if done else 0.0
        after = epsilon(q, sigma, (done + 1) * steps, self.spec.delta)
        # Checked again at every round, not only when the proposal was accepted: other
        # sessions may have spent from the same budget since.
        spent = self.ledger.privacy_spent(self.me).epsilon
        if spent + (after - before) > self.max_epsilon + 1e-12:
            raise PrivacyBudgetError(
                f"{self.me} refuses round: it would spend epsilon {after - before:.4g}, "
                f"{spent:.4g} of its budget {self.max_epsilon:.4g} is already spent"
            )
        # delta is the session's; it is charged once, with the first round.
        return float(after - before), self.spec.delta if done == 0 else 0.0

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        kind = self.spec.kind_of(round_)
        total = self.quantizer(round_).dequantize_sum(aggregate, len(survivors))
        if kind is RoundKind.STANDARDIZE:
            mean, std = global_standardizer(total, self.spec.input_dim)
            return RoundResult(
                model=np.concatenate((mean, std)).astype("<f8").tobytes(),
                metrics={
                    "round_kind": kind.value,
                    "examples": round(float(total[0])),
                    "standardization": {"mean": mean.tolist(), "std": std.tolist()},
                },
            )
        from .training import metrics_from_sums

        p = self.spec.n_parameters()
        base = self.global_weights(round_).astype(np.float64)
        examples = float(total[p])
        new = base
        if kind is RoundKind.TRAIN and examples >= 0.5:
            new = base + total[:p] / examples
        metrics: dict[str, Any] = _json_safe(metrics_from_sums(total[p + 1 :]))
        metrics["n"] = round(metrics["n"] or 0)
        metrics.update(
            round_kind=kind.value,
            examples=round(examples),
            evaluated="model entering this round",
        )
        return RoundResult(model=new.astype("<f4").tobytes(), metrics=metrics)


def training_payload(
    proposal: SessionProposal, config: PeerConfig, ledger: Ledger
) -> TrainingPayload:
    spec = TrainingSpec.from_payload(proposal.payload)
    if proposal.rounds != spec.rounds:
        raise ProposalError(
            f"a training session with {spec.training_rounds} training rounds has "
            f"{spec.rounds} rounds (standardization, training, final evaluation), "
            f"not {proposal.rounds}"
        )
    if proposal.bits != 64:
        raise ProposalError("training sessions aggregate in the 64-bit ring (bits = 64)")
    return TrainingPayload(
        proposal,
        spec,
        config.peer_id,
        PatientStore(config.data_url),
        ledger,
        max_epsilon=config.policy.max_epsilon,
    )
