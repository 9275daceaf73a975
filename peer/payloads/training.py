"""Federated DP-SGD training as a round payload: what a hospital contributes and concludes.

A training session (payload kind ``"training"``) has ``training_rounds + 2`` rounds:

1. **standardize** — each hospital contributes ``[n, sum(x/B), sum((x/B)^2)]`` of its
   training features, each feature clipped to its public bound ``B`` (``feature_bound``),
   plus Gaussian noise; the agreed sum gives every peer the same global mean and standard
   deviation (stored in the round's agreed metrics).
2. ... ``training_rounds + 1`` — **train**: each hospital evaluates the global model that
   enters the round on its test split, trains it locally with DP-SGD, and contributes
   ``[w_h * clip(delta_h), noisy evaluation sums]``. The new global model is
   ``w + clip(sum(w_h delta_h) / sum(w_h))`` over the survivors, with the public weights
   ``w_h`` of the proposal; the agreed metrics are those of the entering model.
3. last — **evaluate**: the final model's noisy evaluation sums only.

Privacy: nothing leaves a hospital without noise, and every release is charged before it
leaves (:func:`peer.round.charge_before_release`):

- the update carries DP-SGD's noise (Poisson-sampled Gaussian, ``noise_multiplier``);
- the standardization sums carry Gaussian noise of ``standardize_noise`` times their L2
  sensitivity ``sqrt(1 + 2d)`` (one record adds 1 to the count and at most 1 to each of the
  2d normalized sums);
- the evaluation sums carry Gaussian noise of ``eval_noise`` times their sensitivity, which
  depends on the task (:mod:`peer.payloads.evaluation`). Binary: ``sqrt(3)``: one test
  record adds at most 1 to the normalized loss sum (losses clipped to ``loss_bound``), 1 to
  one confusion cell and 1 to one histogram cell. The number of correct predictions and the
  example count are not released: they are derived from the noisy confusion cells.

Tasks (``task``): ``"binary"`` (default; one logit), ``"multiclass"`` (``classes = K``
logits, softmax; labels are class indices) and ``"regression"`` (one output; the stored
``target`` column, centred on the public ``target_center`` and clipped to ``target_bound``
around it, residuals to ``residual_bound``).
Every agreed metric is computed from the secure sum of the evaluation releases only.

A retried attempt of a round sends the *same* contribution (cached per round and ledger
head), so it releases nothing new and is not charged again; if the ledger moved (the peer
caught up), the contribution is recomputed and charged again. Each hospital adds all the
noise itself (local DP): its release is private even from an aggregator that unmasks it.

Weights: a hospital's weight is public (``weights`` in the proposal, each in (0, 1];
default 1 for everyone), never a count it reports, and its update is clipped to the public
per-coordinate bound, so an honest hospital moves the average by at most ``w_h U / W``;
``conclude`` clamps the average update to ``[-U, U]`` so that no contribution, however
malformed, moves a coordinate further than honest ones could together.

Only masked, quantized vectors leave a hospital. Every range used for quantization follows
from the session's public parameters, so it is the same at every peer and ``conclude`` is
deterministic.

Proposal payload keys (all public, all in the signed proposal)::

    {"kind": "training", "model": "logreg" | "mlp", "hidden": [64, 32], "input_dim": 30,
     "training_rounds": 3, "local_steps": 50, "batch_size": 64, "lr": 0.5, "clip_norm": 1.0,
     "noise_multiplier": 1.0, "delta": 1e-5, "max_records": 100000,
     "feature_bound": 1e4 (or one bound per feature), "loss_bound": 50.0,
     "histogram_bins": 20, "standardize_noise": 8.0, "eval_noise": 5.0,
     "weights": {"hospital-a": 1.0, ...} (optional),
     "task": "binary" | "multiclass" | "regression", "classes": 3 (multiclass),
     "target_bound": 200.0, "target_center": 180.0 (default 0),
     "residual_bound": 400.0 (regression; default 2 * target_bound)}
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from secagg import Quantizer
from secagg.ring import WordArray

from ..data import PatientStore, local_feature_stats, standardize
from ..ledger import Ledger
from ..privacy import PrivacyBudgetError, privacy_after
from ..session import ProposalError, SessionProposal
from ..training.accounting import GLOBAL_DELTA, PrivacyEvent
from .base import LocalContribution, RoundResult
from .evaluation import Task, TaskEvaluation, task_evaluation

if TYPE_CHECKING:
    import keras

    from ..config import PeerConfig

__all__ = [
    "PrivacyBudgetError",
    "RoundKind",
    "TrainingPayload",
    "TrainingSpec",
    "noisy_standardizer",
    "training_payload",
]


Vector = npt.NDArray[np.float64]
# Quantization headroom for Gaussian noise, in standard deviations (P ~ 1e-33 per value;
# clipping beyond it would be post-processing anyway).
NOISE_TAIL = 12.0
# The smallest standard deviation a noisy standardization may give, as a fraction of the
# feature's bound (noise can make the variance estimate tiny or negative).
MIN_STD_FRACTION = 1e-3


def _noise_generator() -> np.random.Generator:
    """A generator for DP noise, seeded per use with 256 bits from the OS CSPRNG."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "big"))


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
    feature_bound: float | tuple[float, ...] = 1e4
    loss_bound: float = 50.0
    histogram_bins: int = 20
    standardize_noise: float = 8.0
    eval_noise: float = 5.0
    weights: Mapping[str, float] | None = None
    task: str = "binary"
    classes: int = 2
    target_bound: float | None = None
    residual_bound: float | None = None
    target_center: float | None = None

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
            if isinstance(values.get("feature_bound"), list | tuple):
                values["feature_bound"] = tuple(float(b) for b in values["feature_bound"])
            if "weights" in values:
                if not isinstance(values["weights"], Mapping):
                    raise TypeError("'weights' must map each participant to its weight")
                values["weights"] = {str(k): float(v) for k, v in values["weights"].items()}
            spec = cls(**values)
        except (TypeError, ValueError) as error:
            raise ProposalError(f"training payload: {error}") from None
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.model not in ("logreg", "mlp"):
            raise ProposalError(f"model must be 'logreg' or 'mlp', not {self.model!r}")
        bounds = self.feature_bounds() if self.input_dim >= 1 else np.ones(1)
        weights = list((self.weights or {}).values())
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
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ProposalError(f"training payload: invalid {', '.join(bad)}")

    def feature_bounds(self) -> Vector:
        """The public bound ``B_j`` of each feature (|x_j| is clipped to it)."""
        if isinstance(self.feature_bound, tuple):
            if len(self.feature_bound) != self.input_dim:
                raise ProposalError(
                    f"training payload: feature_bound has {len(self.feature_bound)} values "
                    f"for {self.input_dim} features"
                )
            return np.asarray(self.feature_bound, dtype=np.float64)
        return np.full(self.input_dim, float(self.feature_bound))

    def weight(self, peer: str) -> float:
        """The public weight of ``peer``'s update (1 when the proposal names none)."""
        return 1.0 if self.weights is None else float(self.weights[peer])

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
        from ..training import ModelSpec

        return ModelSpec(
            self.model,  # type: ignore[arg-type]
            self.input_dim,
            self.hidden,
            outputs=self.evaluation().outputs,
        )

    def n_parameters(self) -> int:
        return int(self.model_spec().n_parameters())

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
        return self.standardize_noise * math.sqrt(1 + 2 * self.input_dim)

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


def released_evaluation(sums: Vector, spec: TrainingSpec, noise: np.random.Generator) -> Vector:
    """The evaluation sums as released, for every task: each coordinate divided by what one
    record can add to it (so the sensitivity is the task's), derived coordinates withheld,
    Gaussian noise of ``spec.eval_std()`` on every released coordinate."""
    evaluation = spec.evaluation()
    out = np.array(sums, dtype=np.float64) / evaluation.scale()
    released = np.ones(out.shape, dtype=bool)
    released[list(evaluation.withheld())] = False
    out[~released] = 0.0
    out[released] += noise.normal(0.0, spec.eval_std(), int(released.sum()))
    return out


def evaluation_from_release(total: Vector, spec: TrainingSpec) -> Vector:
    """The task's evaluation statistics from a sum of releases (post-processing only: noisy
    counts clamped, withheld coordinates derived; see peer.payloads.evaluation)."""
    return spec.evaluation().from_release(total)


@dataclass
class TrainingPayload:
    """One hospital's side of a training session (the Payload protocol of peer/payloads/base.py)."""

    proposal: SessionProposal
    spec: TrainingSpec
    me: str
    store: PatientStore
    ledger: Ledger
    max_epsilon: float = math.inf  # this institution's total budget (its local policy)
    rng: np.random.Generator = field(
        default_factory=lambda: np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
    )
    # DP noise of the standardization and evaluation releases (DP-SGD has its own, in
    # TensorFlow): a fresh CSPRNG-seeded generator per release. Tests may inject one.
    noise: Callable[[], np.random.Generator] = _noise_generator
    _model: Any = None
    _noise: Any = None
    _data: (
        tuple[
            npt.NDArray[np.float32],
            npt.NDArray[Any],
            npt.NDArray[np.float32],
            npt.NDArray[Any],
        ]
        | None
    ) = None
    # The contribution of each round, per ledger head it was computed at: a retried
    # attempt sends the same value (nothing new is released, nothing new charged).
    _prepared: dict[tuple[int, bytes], LocalContribution] = field(default_factory=dict)

    # ---------------------------------------------------------------- layout and ranges

    def vector_length(self, round_: int) -> int:
        if self.spec.kind_of(round_) is RoundKind.STANDARDIZE:
            return 1 + 2 * self.spec.input_dim
        return self.spec.n_parameters() + self.spec.eval_length()

    def quantizer(self, round_: int) -> Quantizer:
        spec, cap = self.spec, float(self.spec.max_records)
        if spec.kind_of(round_) is RoundKind.STANDARDIZE:
            # Every normalized sum is within [-cap, cap]; the noise needs its tail on top.
            bounds = np.full(1 + 2 * spec.input_dim, cap + NOISE_TAIL * spec.standardize_std())
        else:
            eval_bounds = np.full(spec.eval_length(), cap + NOISE_TAIL * spec.eval_std())
            bounds = np.concatenate(
                (np.full(spec.n_parameters(), max(spec.update_bound(), 1e-6)), eval_bounds)
            )
        return Quantizer(bounds, len(self.proposal.participants), self.proposal.bits)

    # ---------------------------------------------------------------- local state

    def _local_data(self) -> tuple[Any, Any, Any, Any]:
        if self._data is None:
            x_train, train_labels = self.store.load("train")
            x_test, test_labels = self.store.load("test")
            y_train: npt.NDArray[Any] = train_labels
            y_test: npt.NDArray[Any] = test_labels
            evaluation = self.spec.evaluation()
            if evaluation.task is Task.REGRESSION:
                y_train, y_test = self.store.targets("train"), self.store.targets("test")
            for labels in (y_train, y_test):
                evaluation.check_labels(labels, self.me)
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
        from ..training import build_model, get_flat_weights

        return get_flat_weights(build_model(self.spec.model_spec(), self.proposal.seed))

    def _keras_model(self) -> keras.Model:
        if self._model is None:
            from ..training import build_model, secure_generator

            self._model = build_model(self.spec.model_spec(), self.proposal.seed)
            self._noise = secure_generator()
        return self._model

    def sampling_rate(self) -> float:
        x_train = self._local_data()[0]
        return min(1.0, self.spec.batch_size / max(1, len(x_train)))

    def round_events(self, round_: int) -> list[PrivacyEvent]:
        """The DP mechanisms whose output this hospital releases in ``round_``."""
        from ..training.accounting import gaussian_event, poisson_gaussian_event

        kind = self.spec.kind_of(round_)
        if kind is RoundKind.STANDARDIZE:
            return [gaussian_event(self.spec.standardize_noise)]
        events = [gaussian_event(self.spec.eval_noise)]
        if kind is RoundKind.TRAIN:
            if self.spec.noise_multiplier == 0:
                raise PrivacyBudgetError(f"{self.me} refuses to train without DP noise")
            events.append(
                poisson_gaussian_event(
                    self.sampling_rate(), self.spec.noise_multiplier, self.spec.local_steps
                )
            )
        return events

    def finish(self, ledger: Ledger, proposal: SessionProposal) -> None:
        return None  # every round's model is already in the ledger (its checkpoint)

    def epsilon_needed(self) -> float:
        """How much this session raises this hospital's composed epsilon (PLD, whole history).

        The node adds it to ``ledger.privacy_spent(me).epsilon`` (the composed figure), so the
        sum is the composed epsilon of the history plus every release of this session.
        """
        if self.spec.noise_multiplier == 0:
            return math.inf
        events = [e for r in range(1, self.spec.rounds + 1) for e in self.round_events(r)]
        before, after = privacy_after(self.ledger, self.me, events)
        return after - before

    # ---------------------------------------------------------------- the Payload protocol

    def prepare(self, round_: int) -> LocalContribution:
        key = (round_, self.ledger.session_head(self.proposal.session_id))
        cached = self._prepared.get(key)
        if cached is not None:
            return cached
        contribution = self._prepare(round_)
        self._prepared[key] = contribution
        return contribution

    def _prepare(self, round_: int) -> LocalContribution:
        from ..training import local_train, set_flat_weights

        spec = self.spec
        kind = spec.kind_of(round_)
        x_train, y_train, x_test, y_test = self._local_data()
        events = self.round_events(round_)
        epsilon_spent = self._check_budget(round_, events)
        noise = self.noise()
        if kind is RoundKind.STANDARDIZE:
            bounds = spec.feature_bounds()
            normalized = np.clip(np.asarray(x_train, dtype=np.float64) / bounds, -1.0, 1.0)
            vector = local_feature_stats(normalized)
            vector = vector + noise.normal(0.0, spec.standardize_std(), vector.shape)
        else:
            mean, std = self._standardizer()
            model = self._keras_model()
            set_flat_weights(model, self.global_weights(round_))
            task = spec.evaluation()
            evaluation = task.local_sums(model, standardize(x_test, mean, std), y_test)
            update = np.zeros(spec.n_parameters())
            if kind is RoundKind.TRAIN:
                change, _, _ = local_train(
                    model,
                    standardize(x_train, mean, std),
                    task.training_targets(y_train),
                    steps=spec.local_steps,
                    sampling_rate=self.sampling_rate(),
                    lr=spec.lr,
                    clip_norm=spec.clip_norm,
                    noise_multiplier=spec.noise_multiplier,
                    rng=self._noise,
                    loss=task.loss,
                )
                # Clipping to the public bound is post-processing of the DP update; the
                # weight is public: no local count enters the vector.
                bound = spec.update_bound()
                update = np.clip(change.astype(np.float64), -bound, bound) * spec.weight(self.me)
            vector = np.concatenate((update, released_evaluation(evaluation, spec, noise)))
        quantized = self.quantizer(round_).quantize(vector, self.rng)
        return LocalContribution(
            quantized.values,
            epsilon=epsilon_spent,
            delta=0.0,  # the composed figure is reported at the global delta
            clipped_fraction=quantized.clipped_fraction,
            events=tuple(events),
        )

    def _check_budget(self, round_: int, events: list[PrivacyEvent]) -> float:
        """Epsilon of this round: the increase of this hospital's composed PLD epsilon.

        Checked at every round, not only when the proposal was accepted: other sessions
        (and retried attempts) may have spent from the same budget since.
        """
        before, after = privacy_after(self.ledger, self.me, events)
        if after > self.max_epsilon + 1e-12:
            raise PrivacyBudgetError(
                f"{self.me} refuses round {round_}: it would spend epsilon "
                f"{after - before:.4g}, {before:.4g} of its budget {self.max_epsilon:.4g} "
                "is already spent"
            )
        return float(after - before)

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        spec = self.spec
        kind = spec.kind_of(round_)
        total = self.quantizer(round_).dequantize_sum(aggregate, len(survivors))
        dp: dict[str, Any] = {"delta": GLOBAL_DELTA}
        if kind is RoundKind.STANDARDIZE:
            mean, std = noisy_standardizer(total, spec.feature_bounds())
            dp["standardization"] = {"mechanism": "gaussian", "sigma": spec.standardize_noise}
            return RoundResult(
                model=np.concatenate((mean, std)).astype("<f8").tobytes(),
                metrics={
                    "round_kind": kind.value,
                    "examples": max(0, round(float(total[0]))),
                    "standardization": {"mean": mean.tolist(), "std": std.tolist()},
                    "dp": dp,
                },
            )
        from ..training.federated import fedavg_step

        p = spec.n_parameters()
        base = self.global_weights(round_).astype(np.float64)
        new = base
        if kind is RoundKind.TRAIN:
            weight = sum(spec.weight(peer) for peer in survivors)
            bound = spec.update_bound()
            # The survivors' weights are public: nobody can inflate the divisor. The clamp
            # bounds what any contribution, however malformed, does to a coordinate.
            new = fedavg_step(base, total[:p], weight, bound)
            dp["update"] = {
                "mechanism": "poisson-gaussian",
                "sigma": spec.noise_multiplier,
                "steps": spec.local_steps,
            }
        # Every agreed metric comes from the secure sum of the (noisy, charged) releases only.
        metrics = spec.evaluation().agreed_metrics(evaluation_from_release(total[p:], spec))
        dp["evaluation"] = {"mechanism": "gaussian", "sigma": spec.eval_noise}
        metrics.update(round_kind=kind.value, evaluated="model entering this round", dp=dp)
        return RoundResult(model=new.astype("<f4").tobytes(), metrics=metrics)


def noisy_standardizer(total: Vector, bounds: Vector) -> tuple[Vector, Vector]:
    """Mean and standard deviation from the noisy sum of normalized feature statistics.

    Post-processing only: the count is at least 1, the normalized mean within [-1, 1], the
    variance within [MIN_STD_FRACTION^2, 1]; then scaled back by each feature's bound.
    """
    d = len(bounds)
    n = max(float(total[0]), 1.0)
    mean = np.clip(total[1 : 1 + d] / n, -1.0, 1.0)
    var = np.clip(total[1 + d :] / n - np.square(mean), MIN_STD_FRACTION**2, 1.0)
    return mean * bounds, np.sqrt(var) * bounds


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
    spec.feature_bounds()  # its length must match the features
    if spec.weights is not None and set(spec.weights) != set(proposal.participants):
        missing = sorted(set(proposal.participants) - set(spec.weights))
        extra = sorted(set(spec.weights) - set(proposal.participants))
        raise ProposalError(
            "training payload: 'weights' must name every participant and no one else "
            f"(missing: {', '.join(missing) or '-'}; not participants: {', '.join(extra) or '-'})"
        )
    return TrainingPayload(
        proposal,
        spec,
        config.peer_id,
        PatientStore(config.data_url),
        ledger,
        max_epsilon=config.policy.max_epsilon,
    )
