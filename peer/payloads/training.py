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

    {"kind": "training", "model": "logreg" | "mlp" | "cnn" | "declared", "hidden": [64, 32],
     "input_dim": 30, "filters": [8, 16] (cnn), "model_json": "{...}" (declared),
     "image": {"size": [64, 64], "channels": 1, "normalization": "max_value"} (images),
     "training_rounds": 3, "local_steps": 50, "batch_size": 64, "lr": 0.5, "clip_norm": 1.0,
     "noise_multiplier": 1.0, "delta": 1e-5, "max_records": 100000,
     "feature_bound": 1e4 (or one bound per feature), "loss_bound": 50.0,
     "histogram_bins": 20, "standardize_noise": 8.0, "eval_noise": 5.0,
     "weights": {"hospital-a": 1.0, ...} (optional),
     "optimizer": "fedavg" | "fedadam" | "fedyogi", "server_lr": 1.0, "beta1": 0.9,
     "beta2": 0.99, "tau": 1e-3 (adaptive only), "prox_mu": 0.0 (FedProx),
     "task": "binary" | "multiclass" | "regression", "classes": 3 (multiclass),
     "target_bound": 200.0, "target_center": 180.0 (default 0),
     "residual_bound": 400.0 (regression; default 2 * target_bound)}


The model and the data (:mod:`.training_inputs`): every model is a declared Keras model
checked by each site's policy; each site reads its own ``[data]`` source. An imaging session
has no features to standardize: its round 1 releases the noisy record count only.

Server optimizer (:mod:`peer.training.server_optim`): the clamped average update is the
pseudo-gradient of FedAvg, FedAdam or FedYogi, computed identically by every peer. The
adaptive moments live in the ledger, not in memory: a training round's checkpoint is the new
weights followed by the optimizer state (float32 ``m ‖ v``; nothing for FedAvg), so a
restarted or catching-up peer reads the same state as everyone else. The final evaluation
round's checkpoint is the weights alone. FedProx (``prox_mu``) adds ``mu (w - w_global)`` to
each local step after clipping and noising (:mod:`peer.training.dpsgd`): it is not
data-dependent, so the privacy accounting is unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from secagg import Quantizer
from secagg.ring import WordArray

from ..data import data_source, local_feature_stats, standardize
from ..ledger import Ledger
from ..privacy import PrivacyBudgetError, privacy_after
from ..session import ProposalError, SessionProposal
from ..training.accounting import GLOBAL_DELTA, PrivacyEvent
from ..training.server_optim import ServerState
from .base import LocalContribution, RoundResult
from .evaluation import Task
from .training_inputs import SiteData, check_model, train_declared
from .training_spec import TRAINING_BITS, RoundKind, TrainingSpec, Vector

if TYPE_CHECKING:
    import keras

    from ..config import PeerConfig

__all__ = [
    "PrivacyBudgetError",
    "RoundKind",
    "TrainingPayload",
    "TrainingSpec",
    "check_training_proposal",
    "noisy_standardizer",
    "training_payload",
]


# Quantization headroom for Gaussian noise, in standard deviations (P ~ 1e-33 per value;
# clipping beyond it would be post-processing anyway).
NOISE_TAIL = 12.0
# The smallest standard deviation a noisy standardization may give, as a fraction of the
# feature's bound (noise can make the variance estimate tiny or negative).
MIN_STD_FRACTION = 1e-3


def _noise_generator() -> np.random.Generator:
    """A generator for DP noise, seeded per use with 256 bits from the OS CSPRNG."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "big"))


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
    site: SiteData  # this site's data, checked against the proposal
    ledger: Ledger
    max_epsilon: float = math.inf  # this institution's total budget (its local policy)
    model_policy: Any = None  # this site's ModelPolicy (None: the built-in default)
    rng: np.random.Generator = field(
        default_factory=lambda: np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
    )
    # DP noise of the standardization and evaluation releases (DP-SGD has its own, in
    # TensorFlow): a fresh CSPRNG-seeded generator per release. Tests may inject one.
    noise: Callable[[], np.random.Generator] = _noise_generator
    _model: Any = None
    _noise: Any = None
    _trainer: Any = None  # LayerwiseDPSGD of a declared (non-Dense-preset) model
    # The contribution of each round, per ledger head it was computed at: a retried
    # attempt sends the same value (nothing new is released, nothing new charged).
    _prepared: dict[tuple[int, bytes], LocalContribution] = field(default_factory=dict)

    # ---------------------------------------------------------------- layout and ranges

    def vector_length(self, round_: int) -> int:
        if self.spec.kind_of(round_) is RoundKind.STANDARDIZE:
            return 1 + 2 * self.spec.standardized_dim
        return self.spec.n_parameters() + self.spec.eval_length()

    def quantizer(self, round_: int) -> Quantizer:
        spec, cap = self.spec, float(self.spec.max_records)
        if spec.kind_of(round_) is RoundKind.STANDARDIZE:
            # Every normalized sum is within [-cap, cap]; the noise needs its tail on top.
            bounds = np.full(
                1 + 2 * spec.standardized_dim, cap + NOISE_TAIL * spec.standardize_std()
            )
        else:
            eval_bounds = np.full(spec.eval_length(), cap + NOISE_TAIL * spec.eval_std())
            bounds = np.concatenate(
                (np.full(spec.n_parameters(), max(spec.update_bound(), 1e-6)), eval_bounds)
            )
        return Quantizer(bounds, len(self.proposal.participants), self.proposal.bits)

    # ---------------------------------------------------------------- local state

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

    def _agreed_checkpoint(self, before_round: int) -> npt.NDArray[np.float32] | None:
        """The checkpoint of the last agreed model round before ``before_round`` (None if none):
        the weights, then the server optimizer's state (module docstring)."""
        latest = None
        for stored in self.ledger.agreed_records(self.proposal.session_id):
            if 2 <= stored.record.round < before_round:
                latest = stored.record.round
        if latest is None:
            return None
        checkpoint = self.ledger.get_checkpoint(self.proposal.session_id, latest)
        if checkpoint is None:
            raise ValueError(f"the agreed model of round {latest} is missing from the ledger")
        return np.frombuffer(checkpoint.weights, dtype="<f4").astype(np.float32)

    def server_state(self, before_round: int) -> ServerState:
        """The server optimizer's agreed state entering ``before_round`` (read from the ledger)."""
        optimizer, p = self.spec.server_optimizer(), self.spec.n_parameters()
        stored = self._agreed_checkpoint(before_round)
        if stored is None:
            return optimizer.initial_state(p)
        return optimizer.decode_state(stored[p:], p)

    def global_weights(self, before_round: int) -> npt.NDArray[np.float32]:
        """The agreed global model entering ``before_round`` (initial weights if none)."""
        stored = self._agreed_checkpoint(before_round)
        if stored is not None:
            return stored[: self.spec.n_parameters()]
        from ..training import build_declared_model, get_flat_weights

        # A fresh model from the session seed: bit-identical on every peer.
        policy = self.model_policy or _default_model_policy()
        return get_flat_weights(
            build_declared_model(self.spec.declared_json, self.proposal.seed, policy)
        )

    def _keras_model(self) -> keras.Model:
        if self._model is None:
            from ..training import LayerwiseDPSGD, build_declared_model, secure_generator

            policy = self.model_policy or _default_model_policy()
            model = build_declared_model(self.spec.declared_json, self.proposal.seed, policy)
            task = self.spec.evaluation()
            if tuple(model.output_shape[1:]) != (task.outputs,):
                raise ProposalError(
                    f"the model's output has shape {model.output_shape[1:]}; a {task.task} "
                    f"task needs {task.outputs} output(s) (a last Dense layer of "
                    f"{task.outputs} unit(s), no activation)"
                )
            if self.spec.model not in ("logreg", "mlp"):
                self._trainer = LayerwiseDPSGD(model, loss=task.loss)
            self._model, self._noise = model, secure_generator()
        return self._model

    def sampling_rate(self) -> float:
        return min(1.0, self.spec.batch_size / max(1, self.site.n_train))

    def round_events(self, round_: int) -> list[PrivacyEvent]:
        """The DP mechanisms whose output this hospital releases in ``round_``."""
        if self.spec.kind_of(round_) is RoundKind.TRAIN and self.spec.noise_multiplier == 0:
            raise PrivacyBudgetError(f"{self.me} refuses to train without DP noise")
        return self.spec.round_events(round_, self.sampling_rate())

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
        events = self.round_events(round_)
        epsilon_spent = self._check_budget(round_, events)
        noise = self.noise()
        if kind is RoundKind.STANDARDIZE:
            bounds = spec.feature_bounds()
            x_train = self.site.features_for_standardization()
            normalized = np.clip(np.asarray(x_train, dtype=np.float64) / bounds, -1.0, 1.0)
            vector = local_feature_stats(normalized)
            vector = vector + noise.normal(0.0, spec.standardize_std(), vector.shape)
        else:
            mean, std = self._standardizer()

            def prepare(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
                return x if spec.image is not None else standardize(x, mean, std)

            model = self._keras_model()
            set_flat_weights(model, self.global_weights(round_))
            task = spec.evaluation()
            evaluation = self.site.sum_over_test(lambda x, y: task.local_sums(model, prepare(x), y))
            update = np.zeros(spec.n_parameters())
            if kind is RoundKind.TRAIN:
                q, sigma = self.sampling_rate(), spec.noise_multiplier
                if self._trainer is not None:  # a declared model: per-layer DP-SGD
                    change = train_declared(
                        model, self._trainer, self.site, prepare, steps=spec.local_steps,
                        sampling_rate=q, lr=spec.lr, clip_norm=spec.clip_norm,
                        noise_multiplier=sigma, generator=self._noise, prox_mu=spec.prox_mu,
                        targets=task.training_targets,
                    )  # fmt: skip
                else:  # the Dense presets: the fused Dense-only trainer
                    x_train, y_train = self.site.arrays("train")
                    change, _, _ = local_train(
                        model, prepare(x_train), task.training_targets(y_train),
                        steps=spec.local_steps, sampling_rate=q, lr=spec.lr,
                        clip_norm=spec.clip_norm, noise_multiplier=sigma, rng=self._noise,
                        prox_mu=spec.prox_mu, loss=task.loss,
                    )  # fmt: skip
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
            # The noise on each summed normalized statistic: every survivor added its own.
            noise_std = spec.standardize_std() * math.sqrt(len(survivors))
            mean, std = noisy_standardizer(total, spec.feature_bounds(), noise_std)
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
        from ..training.federated import mean_update

        p = spec.n_parameters()
        base = self.global_weights(round_).astype(np.float64)
        new = base
        if kind is RoundKind.TRAIN:
            weight = sum(spec.weight(peer) for peer in survivors)
            bound = spec.update_bound()
            # The survivors' weights are public: nobody can inflate the divisor. The clamp
            # bounds what any contribution, however malformed, does to a coordinate.
            optimizer = spec.server_optimizer()
            new, state = optimizer.step(
                base, self.server_state(round_), mean_update(total[:p], weight, bound)
            )
            state_tail = optimizer.encode_state(state)
            dp["update"] = {
                "mechanism": "poisson-gaussian",
                "sigma": spec.noise_multiplier,
                "steps": spec.local_steps,
            }
        # Every agreed metric comes from the secure sum of the (noisy, charged) releases only.
        metrics = spec.evaluation().agreed_metrics(evaluation_from_release(total[p:], spec))
        dp["evaluation"] = {"mechanism": "gaussian", "sigma": spec.eval_noise}
        metrics.update(round_kind=kind.value, evaluated="model entering this round", dp=dp)
        if kind is RoundKind.TRAIN:  # the optimizer state goes into the signed checkpoint
            weights = np.concatenate((new.astype("<f4"), state_tail.astype("<f4")))
            return RoundResult(model=weights.tobytes(), metrics=metrics)
        return RoundResult(model=new.astype("<f4").tobytes(), metrics=metrics)


def noisy_standardizer(
    total: Vector, bounds: Vector, noise_std: float = 0.0
) -> tuple[Vector, Vector]:
    """Mean and standard deviation from the noisy sum of normalized feature statistics.

    Post-processing only: the count is at least 1, the normalized mean within [-1, 1], the
    variance within [floor, 1]; then scaled back by each feature's bound.

    The floor is the larger of ``MIN_STD_FRACTION^2`` and the standard deviation of the
    variance estimate's own noise, about ``noise_std / n * sqrt(1 + 4 mean^2)``
    (``noise_std``: the Gaussian noise on each summed normalized statistic). A variance
    estimate below it cannot be told from zero. Trusting it (the floor was
    ``MIN_STD_FRACTION^2`` alone) divided a feature by a standard deviation up to ~1000x too
    small, which blew the standardized feature, and the DP-SGD noise on its weight in logit
    units, up by as much: training diverged in a large fraction of runs. A feature whose
    spread is small against its public bound (breast cancer with bounds 1.5x the largest
    value: normalized variances 0.002-0.04, against noise 0.03 at 450 records) got a negative
    variance estimate about half the time. Erring towards a larger standard deviation only
    shrinks the feature, which training absorbs.
    """
    d = len(bounds)
    n = max(float(total[0]), 1.0)
    mean = np.clip(total[1 : 1 + d] / n, -1.0, 1.0)
    # sum(x^2)/n and mean^2 both carry noise: std noise_std/n and about 2|mean| noise_std/n.
    spread = noise_std / n * np.sqrt(1.0 + 4.0 * np.square(mean))
    floor = np.clip(spread, MIN_STD_FRACTION**2, 1.0)
    var = np.clip(total[1 + d :] / n - np.square(mean), floor, 1.0)
    return mean * bounds, np.sqrt(var) * bounds


def check_training_proposal(proposal: SessionProposal) -> TrainingSpec:
    """What every site checks of a training proposal before its own policy and data (also
    what ``ceremony run --dry-run`` checks).

    Raises:
        ProposalError: the reason, saying what to write instead where it can.
    """
    spec = TrainingSpec.from_payload(proposal.payload)
    if proposal.rounds != spec.rounds:
        raise ProposalError(
            f"a training session with {spec.training_rounds} training rounds has "
            f"{spec.rounds} rounds (standardization, training, final evaluation), "
            f"not {proposal.rounds}"
        )
    if proposal.bits != TRAINING_BITS:
        raise ProposalError(
            f"training sessions aggregate in the {TRAINING_BITS}-bit ring: write "
            f"bits = {TRAINING_BITS} in [session], or leave bits out (ceremony run then "
            "picks it from the payload)"
        )
    spec.feature_bounds()  # its length must match the features
    if spec.weights is not None and set(spec.weights) != set(proposal.participants):
        missing = sorted(set(proposal.participants) - set(spec.weights))
        extra = sorted(set(spec.weights) - set(proposal.participants))
        raise ProposalError(
            "training payload: 'weights' must name every participant and no one else "
            f"(missing: {', '.join(missing) or '-'}; not participants: {', '.join(extra) or '-'})"
        )
    return spec


def training_payload(
    proposal: SessionProposal, config: PeerConfig, ledger: Ledger
) -> TrainingPayload:
    spec = check_training_proposal(proposal)
    # The site's model policy first: a refused model costs no data access.
    check_model(spec.declared_json, config.policy.models, config.peer_id)
    source = data_source(config.data, config.directory, config.data_url)
    task = spec.evaluation()
    site = SiteData(
        source,
        config.peer_id,
        spec.input_shape,
        spec.image,
        spec.max_records,
        n_classes=spec.classes,
        regression=task.task is Task.REGRESSION,
    )
    if spec.image is None:  # labels (or targets) the task cannot use, named per column
        for split in ("train", "test"):
            task.check_labels(site.arrays(split)[1], config.peer_id)
    payload = TrainingPayload(
        proposal,
        spec,
        config.peer_id,
        site,
        ledger,
        max_epsilon=config.policy.max_epsilon,
        model_policy=config.policy.models,
    )
    payload._keras_model()  # Keras loads it (safe mode) and its output fits the task, now
    return payload


def _default_model_policy() -> Any:
    from ..training import ModelPolicy

    return ModelPolicy()
