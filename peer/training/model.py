"""The model every peer trains: a small Keras 3 MLP (or logistic regression) of Dense layers.

All peers of a session must start from bit-identical weights, derived from the session seed
alone: every initializer is given an explicit seed (the session seed plus the layer index), so
no global or unseeded random state is involved. Only Dense layers are used: no BatchNorm
(it mixes examples, which breaks per-example clipping and leaks batch statistics) and no
dropout (randomness outside the DP accounting).

The last layer outputs ``outputs`` values: one *logit* for a binary task (the probability of
the positive class is its sigmoid), ``K`` logits for a K-class task (softmax), one value for
regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import keras

__all__ = ["ModelSpec", "build_model", "dense_layers", "get_flat_weights", "set_flat_weights"]

_ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What model a session trains (it is part of the session proposal).

    Attributes:
        kind: ``"mlp"`` (hidden Dense layers) or ``"logreg"`` (a single Dense unit).
        input_dim: number of features.
        hidden: widths of the hidden layers (``"mlp"`` only).
        activation: hidden-layer activation.
        outputs: width of the last layer (1, or the number of classes of a multi-class task).
    """

    kind: Literal["mlp", "logreg"]
    input_dim: int
    hidden: tuple[int, ...] = (64, 32)
    activation: str = "relu"
    outputs: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "logreg"):
            raise ValueError(f"model kind must be 'mlp' or 'logreg', not {self.kind!r}")
        if self.input_dim < 1:
            raise ValueError(f"input_dim must be positive, not {self.input_dim}")
        if self.kind == "mlp" and (not self.hidden or any(w < 1 for w in self.hidden)):
            raise ValueError(f"an mlp needs positive hidden widths, not {self.hidden}")
        if self.outputs < 1:
            raise ValueError(f"outputs must be positive, not {self.outputs}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, not {self.activation!r}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Output widths of every Dense layer, the last (``outputs`` logits) included."""
        return (*self.hidden, self.outputs) if self.kind == "mlp" else (self.outputs,)

    def n_parameters(self) -> int:
        """Number of trainable parameters (kernels and biases)."""
        total, fan_in = 0, self.input_dim
        for width in self.widths:
            total += fan_in * width + width
            fan_in = width
        return total

    def to_json(self) -> str:
        """This preset as a declared model (the JSON Keras writes; see peer.training.declared)."""
        from .declared import preset_json

        return preset_json(self)


def build_model(spec: ModelSpec, seed: int) -> keras.Sequential:
    """Build and initialise the model of ``spec``, identically on every peer for one ``seed``.

    The preset is built through the declared-model path (its JSON, loaded in safe mode), so
    presets and declared models are one path. Kernels use Glorot-uniform with seed
    ``seed + layer index``; biases start at zero.
    """
    from .declared import PRESET_POLICY, build_declared_model

    return build_declared_model(spec.to_json(), seed, PRESET_POLICY)


def dense_layers(model: keras.Model) -> list[Any]:
    """The model's Dense layers, checking that there is nothing else that has weights.

    Raises:
        TypeError: the model has a layer with weights that is not a biased Dense layer.
    """
    import keras

    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            if not layer.use_bias:
                raise TypeError(f"layer {layer.name!r} has no bias; DP-SGD here assumes one")
            layers.append(layer)
        elif layer.weights:
            raise TypeError(
                f"layer {layer.name!r} ({type(layer).__name__}) is not Dense; only Dense "
                "layers are supported by the per-example gradient norm computation"
            )
    if not layers:
        raise TypeError("the model has no Dense layers")
    return layers


def get_flat_weights(model: keras.Model) -> npt.NDArray[np.float32]:
    """All trainable weights concatenated in a fixed order (layer by layer, kernel then bias)."""
    parts = [np.asarray(v.numpy(), dtype=np.float32).ravel() for v in model.trainable_variables]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def set_flat_weights(model: keras.Model, vector: npt.ArrayLike) -> None:
    """Inverse of :func:`get_flat_weights`.

    Raises:
        ValueError: the vector's length is not the model's parameter count, or it is not
            finite.
    """
    flat = np.asarray(vector, dtype=np.float32)
    variables = list(model.trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in variables)
    if flat.shape != (total,):
        raise ValueError(f"weight vector has shape {flat.shape}, the model has {total} weights")
    if not np.all(np.isfinite(flat)):
        raise ValueError("weight vector contains NaN or infinity")
    start = 0
    for variable in variables:
        size = int(np.prod(variable.shape))
        variable.assign(flat[start : start + size].reshape(tuple(variable.shape)))
        start += size
