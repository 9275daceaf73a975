"""What a training session trains, and on what: its declared model and this site's data.

Split out of :mod:`peer.payloads.training` (which keeps the round logic: releases, noise,
aggregation, metrics). Two halves:

**The model.** A session names a preset (``logreg``, ``mlp``, ``cnn``) or declares its own
Keras architecture (``model = "declared"`` with ``model_json``, the JSON ``model.to_json()``
writes). Either way the model *is* a declared model: presets are only JSON generated from a
few numbers (:func:`model_json_of`). Every site checks that JSON against its own
:class:`~peer.training.declared.ModelPolicy` (``[policy.models]`` in its configuration) when
the proposal arrives, and refuses with the reason (a forbidden layer, too many parameters);
nothing is built before that check, and Keras then loads it with ``safe_mode``.

**The data.** A site's records come through the :class:`~peer.data.DataSource` protocol, from
whatever its configuration's ``[data]`` table names: the imported patient store, a read-only
SQL query or an image folder. A proposal never names a site's database or query (the keys are
refused). For images the *proposal* declares the preprocessing (size, channels,
normalization) so every site feeds the model the same thing; the site decodes its own files
that way. What the proposal is checked against is the source's metadata (kind, input shape,
records per label), never a record or a pixel. Images are streamed from disk through
``tf.data``: each DP-SGD step decodes only the images its Poisson sample picked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..data import DataSetInfo, DataSource, ImageFolderSource, PatientStore, SQLSource
from ..published import PublishableError
from ..session import ProposalError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from ..training import ModelPolicy

__all__ = [
    "MODELS",
    "PRESETS",
    "ImageInput",
    "SiteData",
    "count_parameters",
    "declared_input_shape",
    "model_json_of",
    "train_declared",
]

LOG = logging.getLogger(__name__)

PRESETS = ("logreg", "mlp", "cnn")
MODELS = (*PRESETS, "declared")
# Keys that would make a proposal choose what a site reads: refused, with the reason.
SITE_ONLY_KEYS = ("data", "query", "sql", "url", "folder")
_EVAL_BATCH = 256


@dataclass(frozen=True, slots=True)
class ImageInput:
    """The image preprocessing a proposal declares (``image = {...}`` in the payload).

    Attributes:
        size: (height, width) every image is resized to.
        channels: 1 (grayscale) or 3.
        normalization: ``"max_value"`` or ``"min_max"`` (:mod:`peer.data.images`).
    """

    size: tuple[int, int]
    channels: int = 1
    normalization: str = "max_value"

    @classmethod
    def from_payload(cls, value: Any) -> ImageInput:
        if not isinstance(value, Mapping):
            raise ProposalError("training payload: 'image' must be a table (size, channels, ...)")
        unknown = sorted(set(value) - {"size", "channels", "normalization"})
        if unknown:
            raise ProposalError(f"training payload: unknown image keys: {', '.join(unknown)}")
        size = value.get("size")
        if (
            not isinstance(size, list | tuple)
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
        ):
            raise ProposalError(
                f"training payload: image.size must be [height, width], not {size!r}"
            )
        image = cls(
            (int(size[0]), int(size[1])),
            int(value.get("channels", 1)),
            str(value.get("normalization", "max_value")),
        )
        if image.channels not in (1, 3):
            raise ProposalError(
                f"training payload: image.channels must be 1 or 3, not {image.channels}"
            )
        if image.normalization not in ("max_value", "min_max"):
            raise ProposalError(
                "training payload: image.normalization must be 'max_value' or 'min_max', "
                f"not {image.normalization!r}"
            )
        if image.size[0] * image.size[1] > 1024 * 1024:
            raise ProposalError(f"training payload: image.size {image.size} is too large")
        return image

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size[0], self.size[1], self.channels)

    def as_payload(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "channels": self.channels,
            "normalization": self.normalization,
        }


# --------------------------------------------------------------------------- the model


def model_json_of(
    model: str,
    input_shape: tuple[int, ...],
    hidden: tuple[int, ...],
    filters: tuple[int, ...],
    declared: str | None,
    outputs: int = 1,
) -> str:
    """The declared-model JSON of a session: ``declared`` itself, or a preset's.

    ``cnn``: each image standardized on its own (``GroupNormalization`` with one group), per
    entry of ``filters`` a 3x3 ``Conv2D`` (ReLU) and a 2x2 max pooling, then a global max
    pooling, a ``LayerNormalization`` of those features, a ReLU ``Dense`` layer per entry of
    ``hidden`` and ``outputs`` logits (one, or the classes of a multi-class task).
    """
    if model == "declared":
        if declared is None:
            raise ProposalError("training payload: model = 'declared' needs 'model_json'")
        return declared
    if model in ("logreg", "mlp"):
        from ..training import ModelSpec

        if len(input_shape) != 1:
            raise ProposalError(
                f"training payload: model {model!r} takes feature vectors, "
                "not images (use model = 'cnn' or a declared model)"
            )
        return ModelSpec(model, input_shape[0], hidden, outputs=outputs).to_json()  # type: ignore[arg-type]
    if model == "cnn":
        return _cnn_json(input_shape, filters, hidden, outputs)
    raise ProposalError(f"model must be one of {', '.join(MODELS)}, not {model!r}")


def _cnn_json(
    input_shape: tuple[int, ...],
    filters: tuple[int, ...],
    hidden: tuple[int, ...],
    outputs: int = 1,
) -> str:
    import keras

    if len(input_shape) != 3:
        raise ProposalError(
            "training payload: model 'cnn' needs an image input "
            "(image = { size = [h, w], channels = 1 })"
        )
    # Both normalizations work on one example at a time (no batch statistics, unlike the
    # refused BatchNormalization) and have fast DP-SGD rules. Without them, what all images
    # share (a site's "scanner" brightness, the common part of the ReLU features) dominated
    # the features: a step moved every logit together faster than it learned to separate
    # lesions, and under non-IID lesion shares the averaged model put all scores on one side
    # of 0.5 (good AUC, accuracy at the majority share; BENCHMARKS.md, issue 12 lane i).
    # Each image to mean 0 and deviation 1 over its own pixels (2 parameters).
    layers: list[Any] = [
        keras.Input(shape=input_shape, dtype="float32"),
        keras.layers.GroupNormalization(groups=1, name="image_norm"),
    ]
    for i, width in enumerate(filters):
        layers.append(keras.layers.Conv2D(width, 3, activation="relu", name=f"conv_{i}"))
        layers.append(keras.layers.MaxPooling2D(2, name=f"pool_{i}"))
    # The strongest response anywhere in the image: a lesion may be anywhere, and a
    # position-free head needs far fewer parameters (less DP noise) than Flatten + Dense.
    layers.append(keras.layers.GlobalMaxPooling2D(name="global_max"))
    # Those responses centred and scaled per image: a shift common to all of them cancels.
    layers.append(keras.layers.LayerNormalization(name="feature_norm"))
    for i, width in enumerate(hidden):
        layers.append(keras.layers.Dense(width, activation="relu", name=f"dense_{i}"))
    layers.append(keras.layers.Dense(outputs, name="logit"))
    try:
        return str(keras.Sequential(layers, name="cnn").to_json())
    except ValueError as error:  # e.g. an image too small for its convolutions
        raise ProposalError(f"training payload: model 'cnn' cannot be built: {error}") from None


def declared_input_shape(model_json: str) -> tuple[int, ...]:
    """The input shape (without the batch dimension) a declared model's JSON states."""
    try:
        layers = json.loads(model_json)["config"]["layers"]
        shape = layers[0]["config"]["batch_shape"][1:]
        return tuple(int(d) for d in shape)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ProposalError(
            "training payload: model_json must be a Sequential model whose first layer is an "
            "InputLayer with a batch_shape (what keras.Sequential([keras.Input(...), ...])"
            ".to_json() writes)"
        ) from None


def count_parameters(model_json: str) -> int:
    """Parameters of a declared model, from its JSON alone (nothing is built).

    Raises:
        ProposalError: the JSON is not a model this project can train (the reason).
    """
    from ..training.declared import ModelPolicy, ModelRefused, layer_names

    try:
        everything = ModelPolicy(frozenset(layer_names(model_json)), max_parameters=2**62)
        return everything.check(model_json)
    except ModelRefused as error:
        raise ProposalError(f"training payload: {error}") from None


def check_model(model_json: str, policy: ModelPolicy, me: str) -> int:
    """This site's verdict on a declared model (before anything is built).

    Raises:
        ProposalError: naming the site and the reason (forbidden layer, too many parameters).
    """
    from ..training.declared import ModelRefused

    try:
        return policy.check(model_json)
    except ModelRefused as error:
        raise ProposalError(f"{me}'s model policy: {error}") from None


# --------------------------------------------------------------------------- the data


class SiteData:
    """One site's data for one session, checked against what the proposal declares.

    Args:
        source: the site's data source (its ``[data]`` table).
        me: the site's peer id (for messages).
        input_shape: the model's input shape, without the batch dimension.
        image: the proposal's image preprocessing, or None for tabular data.
        max_records: the proposal's bound on a site's training records.
        n_classes: labels must be class indices below this (2: binary).
        regression: the training targets are the source's real-valued target column, not
            the labels: the patient store's (``peer data import --target``) or a SQL
            source's ``target_column`` (image folders have none).
            Without it the source must have labels: a SQL source without a label column or
            a patient store imported without one (every label 0) is refused.

    Raises:
        PublishableError: the data does not fit the proposal (its kind, shape, size or
            labels), in words that may reach the operator (they name no patient).
        DataError: the source cannot be read (every problem listed; names patients, so it
            is published as "a data problem", peer/published.py).
    """

    def __init__(
        self,
        source: DataSource,
        me: str,
        input_shape: tuple[int, ...],
        image: ImageInput | None,
        max_records: int,
        n_classes: int = 2,
        regression: bool = False,
    ) -> None:
        if image is not None:
            if not isinstance(source, ImageFolderSource):
                raise PublishableError(
                    f"{me} has no image data: the session trains on images, this site's "
                    "[data] names a tabular source"
                )
            # The proposal's preprocessing, not the site's own defaults: every site must feed
            # the model the same thing.
            source = ImageFolderSource(
                dataclasses.replace(
                    source.config,
                    image_size=image.size,
                    channels=image.channels,
                    normalization=image.normalization,  # type: ignore[arg-type]
                )
            )
        elif isinstance(source, ImageFolderSource):
            raise PublishableError(
                f"{me} has image data: the session trains on feature vectors (declare "
                "image = {{ size = [h, w] }} in the payload for an imaging session)"
            )
        if regression and not _has_targets(source):
            raise PublishableError(
                f"{me}'s [data] source has no regression targets: a regression session reads "
                "a target column, which the patient store has (peer data import --target "
                "COL) and a SQL source has if it declares target_column; image folders have "
                "none"
            )
        if not regression and isinstance(source, SQLSource) and source.config.label_column is None:
            raise PublishableError(
                f"{me}'s [data] SQL source declares no label column (only a target_column): "
                "it can train regression sessions, not classification ones"
            )
        if not regression and isinstance(source, PatientStore) and not source.has_labels():
            raise PublishableError(
                f"{me}'s patient store holds records imported without a label column (peer "
                "data import --target only): it can train regression sessions, not "
                "classification ones; import the records with --label COL into an empty data "
                "database to train one"
            )
        self.source, self.me, self.image, self.regression = source, me, image, regression
        self.info: DataSetInfo = source.describe()
        if tuple(self.info.input_shape) != tuple(input_shape):
            raise PublishableError(
                f"{me}'s data has input shape {self.info.input_shape}; the session's model "
                f"expects {input_shape}"
            )
        self.n_train = self.info.count("train")
        if self.n_train < 1:
            raise PublishableError(f"{me} has no training records")
        if self.n_train > max_records:
            raise PublishableError(
                f"{me} has {self.n_train} training records, more than the session's "
                f"max_records {max_records}"
            )
        labels = {label for counts in self.info.label_counts.values() for label in counts}
        if labels and max(labels) >= n_classes and not regression:
            raise PublishableError(
                f"{me}'s labels go up to {max(labels)}; the session's task has {n_classes} classes"
            )
        self._arrays: dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[Any]]] = {}

    def arrays(self, split: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any]]:
        """A tabular split in memory (a few MB even for 100k patients): the features and
        the labels, or the real-valued targets of a regression session."""
        if self.image is not None:
            raise TypeError("image data is streamed, not loaded whole")
        if split not in self._arrays:
            x, y = self.source.load(split)  # type: ignore[arg-type]
            if self.regression:
                y = self.source.targets(split)  # type: ignore[attr-defined]
            self._arrays[split] = (x, y)
        return self._arrays[split]

    def features_for_standardization(self) -> npt.NDArray[np.float32]:
        """The training inputs whose statistics round 1 releases: none for images (their
        normalization is declared by the proposal), so only the count is released."""
        if self.image is not None:
            return np.zeros((self.n_train, 0), dtype=np.float32)
        return self.arrays("train")[0]

    def test_batches(self) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
        """The test split in batches (images streamed from disk)."""
        if self.image is None:
            x, y = self.arrays("test")
            yield x, y
            return
        for x, y in self.source.tf_dataset("test").batch(_EVAL_BATCH).as_numpy_iterator():
            yield np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)

    def sum_over_test(
        self, evaluate: Callable[[npt.NDArray[np.float32], npt.NDArray[np.int64]], Any]
    ) -> npt.NDArray[np.float64]:
        """The sum of ``evaluate`` (a vector of sums) over the test batches."""
        total: npt.NDArray[np.float64] | None = None
        for x, y in self.test_batches():
            part = np.asarray(evaluate(x, y), dtype=np.float64)
            total = part if total is None else total + part
        if total is None:
            empty = np.zeros((0, *self.info.input_shape), dtype=np.float32)
            total = np.asarray(evaluate(empty, np.zeros(0, dtype=np.int64)), dtype=np.float64)
        return total

    def train_batches(
        self, samples: list[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
        """The training images of each step's sample, decoded from disk as they are needed.

        One ``tf.data`` pipeline over all the steps' indices (decoding in parallel, ahead of
        the step that needs them), not one pipeline per step.
        """
        assert isinstance(self.source, ImageFolderSource)
        flat = np.concatenate(samples) if samples else np.zeros(0, np.int64)
        stream = self.source.tf_dataset("train", indices=flat).prefetch(64).as_numpy_iterator()
        empty = np.zeros((0, *self.info.input_shape), np.float32)
        for sample in samples:
            pairs = [next(stream) for _ in range(sample.size)]
            if not pairs:
                yield empty, np.zeros(0, np.float32)
                continue
            yield (
                np.stack([x for x, _ in pairs]).astype(np.float32),
                np.asarray([y for _, y in pairs], dtype=np.float32),
            )


def _has_targets(source: DataSource) -> bool:
    """Whether a source can give a regression session its targets (``targets(split)``); the
    store's are checked per record when read (a record without one is named)."""
    if isinstance(source, SQLSource):
        return source.config.target_column is not None
    return isinstance(source, PatientStore)


def train_declared(
    model: keras.Model,
    trainer: Any,
    data: SiteData,
    prepare: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
    *,
    steps: int,
    sampling_rate: float,
    lr: float,
    clip_norm: float,
    noise_multiplier: float,
    generator: tf.random.Generator,
    prox_mu: float = 0.0,
    targets: Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]] | None = None,
) -> npt.NDArray[np.float32]:
    """Local DP-SGD of a declared model with :class:`~peer.training.LayerwiseDPSGD`.

    ``targets`` turns labels into what the task's loss takes (e.g. regression targets
    centred and clipped); None keeps them. ``prox_mu > 0`` adds FedProx's pull towards the
    starting (global) weights after each step's clipping and noising, as
    :meth:`peer.training.PoissonTrainer.run` does.

    Tabular data runs in one compiled loop over the in-memory split; images are streamed:
    each step draws its Poisson sample (from ``generator``, as the accountant assumes) and
    decodes only those files. Returns the change of the weights.
    """
    import tensorflow as tf

    from ..training import get_flat_weights

    before = get_flat_weights(model)
    if data.image is None:
        x, y = data.arrays("train")
        trainer.run(
            prepare(x),
            y if targets is None else targets(y),
            steps=steps,
            sampling_rate=sampling_rate,
            lr=lr,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            generator=generator,
            prox_mu=prox_mu,
        )
    else:
        n = data.n_train
        # Every step's Poisson sample, drawn up front from the same generator (the sampling
        # the accountant assumes); then only the sampled files are read, in step order.
        masks = np.asarray(generator.uniform([steps, n], dtype=tf.float32) < sampling_rate)
        samples = [np.flatnonzero(row).astype(np.int64) for row in masks]
        anchors = [tf.identity(v) for v in model.trainable_variables] if prox_mu > 0 else []
        for xb, yb in data.train_batches(samples):
            # FedProx's pull at the step's starting point, applied after the DP step.
            pulls = (
                [prox_mu * (v - a) for v, a in zip(model.trainable_variables, anchors, strict=True)]
                if anchors
                else []
            )
            trainer.dp_step(
                xb,
                yb if targets is None else targets(yb),
                lr=lr,
                clip_norm=clip_norm,
                noise_multiplier=noise_multiplier,
                expected_batch_size=sampling_rate * n,
                generator=generator,
            )
            for variable, pull in zip(model.trainable_variables, pulls, strict=False):
                variable.assign_sub(lr * pull)
    return get_flat_weights(model) - before
