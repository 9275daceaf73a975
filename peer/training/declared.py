"""Models declared as data: a Keras 3 architecture as the JSON Keras writes, checked by a policy.

A session proposes its model as the JSON of ``model.to_json()``; no code is shipped. Each site
checks it against its own :class:`ModelPolicy` before building anything:

* only a ``Sequential`` of layers whose class is in the site's allow list (the DP-SGD trainer
  of :mod:`peer.training.layerwise` walks the layers in order); every layer and initializer
  must be a built-in (``module`` under ``keras.``, no ``registered_name``), so custom objects
  and ``Lambda`` layers (arbitrary code) are refused before Keras sees them, and Keras itself
  loads the JSON with ``safe_mode=True`` as a second line;
* ``BatchNormalization`` is always refused: it mixes the examples of a batch, which breaks
  per-example clipping (one example's gradient depends on the others) and its moving
  statistics are an unaccounted release of batch data; ``Dropout`` and the other random layers
  are refused for the same reason (randomness outside the DP accounting) unless a site allows
  them explicitly;
* activations are named built-ins only (a serialized function would be code);
* the parameter count is computed from the configuration *before* any weight is allocated, so
  a declared 10^12-parameter model is refused, not built.

Bit-identical initial weights on every peer: whatever seeds the JSON carries are replaced by
``session seed + 1000 * initializer slot + layer index``, so the same JSON and the same session
seed build the same weights in any process (Keras' seeded initializers are stateless).
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import keras


__all__ = [
    "DEFAULT_ALLOWED_LAYERS",
    "PRESET_POLICY",
    "ModelPolicy",
    "ModelRefused",
    "build_declared_model",
    "preset_json",
]

# Layers the fast per-example-norm rules of peer.training.layerwise cover, plus parameter-free
# layers whose output for example i depends on input i only.
DEFAULT_ALLOWED_LAYERS: frozenset[str] = frozenset(
    {
        "InputLayer",
        "Dense",
        "Conv1D",
        "Conv2D",
        "Embedding",
        "LayerNormalization",
        "GroupNormalization",
        "MaxPooling1D",
        "MaxPooling2D",
        "AveragePooling1D",
        "AveragePooling2D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "Flatten",
        "Reshape",
        "Activation",
    }
)

# Refused whatever the site allows, with the reason.
_ALWAYS_REFUSED: Mapping[str, str] = {
    "BatchNormalization": (
        "it mixes the examples of a batch (per-example clipping is then wrong) and its "
        "moving statistics release batch data outside the DP accounting"
    ),
    "Lambda": "it carries code, and a session ships no code to a hospital",
    "TFSMLayer": "it loads a saved graph, which is code",
}

_ACTIVATIONS = frozenset(
    {"linear", "relu", "tanh", "sigmoid", "gelu", "elu", "selu", "softplus", "swish", "silu"}
)
# Every key of a layer config that names an initializer (seeded below, in this order).
_INITIALIZER_KEYS = (
    "kernel_initializer",
    "bias_initializer",
    "embeddings_initializer",
    "gamma_initializer",
    "beta_initializer",
    "recurrent_initializer",
    "depthwise_initializer",
    "pointwise_initializer",
)
_SEED_STRIDE = 1000


class ModelRefused(ValueError):
    """A declared model that this site's policy does not accept; the message says why."""


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """What architectures a site trains.

    Attributes:
        allowed_layers: Keras layer class names accepted (``BatchNormalization`` and ``Lambda``
            are refused even if listed).
        max_parameters: largest accepted number of weights (trainable or not).
    """

    allowed_layers: frozenset[str] = field(default=DEFAULT_ALLOWED_LAYERS)
    max_parameters: int = 2_000_000

    def check(self, model_json: str | Mapping[str, Any]) -> int:
        """Check a declared model without building it.

        Returns:
            its number of parameters.

        Raises:
            ModelRefused: naming the first thing refused (layer and type, or the count).
        """
        config = _parse(model_json)
        _check_builtin(config, "model")
        if config.get("class_name") != "Sequential":
            raise ModelRefused(
                f"model class {config.get('class_name')!r} refused: only a Sequential model "
                "is accepted (its layers are trained in order by per-layer DP-SGD)"
            )
        layers = _layer_configs(config)
        for index, layer in enumerate(layers):
            cls = str(layer.get("class_name"))
            name = layer.get("config", {}).get("name", f"#{index}")
            if cls in _ALWAYS_REFUSED:
                raise ModelRefused(f"layer {name!r} ({cls}) refused: {_ALWAYS_REFUSED[cls]}")
            if cls not in self.allowed_layers:
                raise ModelRefused(
                    f"layer {name!r} ({cls}) refused: {cls} is not in this site's allowed "
                    f"layers ({', '.join(sorted(self.allowed_layers))})"
                )
            activation = layer.get("config", {}).get("activation")
            if activation is not None and activation not in _ACTIVATIONS:
                raise ModelRefused(
                    f"layer {name!r} ({cls}) refused: activation {activation!r} is not a "
                    f"named built-in ({', '.join(sorted(_ACTIVATIONS))})"
                )
        count = _count_parameters(layers)
        if count > self.max_parameters:
            raise ModelRefused(
                f"model refused: {count:,} parameters, more than this site's limit of "
                f"{self.max_parameters:,}"
            )
        return count


# What the built-in presets need: Dense layers only, any size a ModelSpec allows.
PRESET_POLICY = ModelPolicy(frozenset({"InputLayer", "Dense"}), max_parameters=2**62)


def build_declared_model(
    model_json: str | Mapping[str, Any], seed: int, policy: ModelPolicy
) -> keras.Sequential:
    """Check ``model_json`` against ``policy``, then build it with weights from ``seed``.

    The same JSON and seed give bit-identical weights in every process and on every peer.

    Raises:
        ModelRefused: the policy refuses the model (nothing is built).
    """
    import keras

    config = _parse(model_json)
    policy.check(config)
    seeded = _seed_initializers(config, seed)
    try:
        model = keras.saving.deserialize_keras_object(seeded, safe_mode=True)
    except Exception as error:  # Keras raises many types for a malformed config
        raise ModelRefused(f"model refused: Keras cannot load it: {error}") from None
    if not isinstance(model, keras.Sequential):  # pragma: no cover - checked above
        raise ModelRefused("model refused: not a Sequential model")
    if not model.built:
        raise ModelRefused("model refused: it declares no input shape (add an InputLayer)")
    return model


class PresetShape(Protocol):
    """What a built-in preset declares (:class:`peer.training.model.ModelSpec` is one); a
    Protocol, so this module does not import the one that imports it."""

    @property
    def kind(self) -> str: ...

    @property
    def input_dim(self) -> int: ...

    @property
    def widths(self) -> tuple[int, ...]: ...

    @property
    def activation(self) -> str: ...


def preset_json(spec: PresetShape) -> str:
    """The declared-model JSON of a built-in preset (logreg or MLP of :class:`ModelSpec`)."""
    import keras

    layers: list[Any] = [keras.Input(shape=(spec.input_dim,), dtype="float32")]
    widths = spec.widths
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        layers.append(
            keras.layers.Dense(
                width,
                activation=None if last else spec.activation,
                kernel_initializer="glorot_uniform",
                bias_initializer="zeros",
                name=f"dense_{i}",
            )
        )
    return str(keras.Sequential(layers, name=f"{spec.kind}_{spec.input_dim}").to_json())


# ---------------------------------------------------------------------- helpers


def _parse(model_json: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(model_json, Mapping):
        return copy.deepcopy(dict(model_json))
    try:
        parsed = json.loads(model_json)
    except (TypeError, ValueError) as error:
        raise ModelRefused(f"model refused: not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise ModelRefused("model refused: the JSON is not an object")
    return parsed


def _check_builtin(node: Any, where: str) -> None:
    """Refuse any serialized object that is not a Keras built-in (custom or registered)."""
    if isinstance(node, dict):
        if "class_name" in node:
            module = node.get("module")
            registered = node.get("registered_name")
            builtin = isinstance(module, str) and (module == "keras" or module.startswith("keras."))
            if not builtin or registered not in (None, node["class_name"]):
                raise ModelRefused(
                    f"{where}: object {node.get('class_name')!r} (module {module!r}, registered "
                    f"{registered!r}) refused: only Keras built-ins, no custom objects"
                )
        for key, value in node.items():
            _check_builtin(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_builtin(value, f"{where}[{i}]")


def _layer_configs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    layers = config.get("config", {}).get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise ModelRefused("model refused: config.layers is not a list of layers")
    return layers


def _ints(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _count_parameters(layers: list[dict[str, Any]]) -> int:
    """Parameter count from the configs alone (no weight allocated), tracking shapes."""
    import keras

    if not layers or layers[0].get("class_name") != "InputLayer":
        raise ModelRefused("model refused: the first layer must be an InputLayer (input shape)")
    batch_shape = layers[0]["config"].get("batch_shape")
    if not isinstance(batch_shape, list) or any(
        d is not None and (not isinstance(d, int) or d < 1) for d in batch_shape[1:]
    ):
        raise ModelRefused(f"model refused: bad input shape {batch_shape!r}")
    shape: tuple[int | None, ...] = tuple(batch_shape)
    total = 0
    for layer_config in layers[1:]:
        cls = layer_config["class_name"]
        cfg = layer_config["config"]
        channels = shape[-1]
        if cls == "Dense":
            total += int(channels or 0) * int(cfg["units"]) + (
                cfg["units"] if cfg["use_bias"] else 0
            )
        elif cls in ("Conv1D", "Conv2D"):
            size = int(np.prod(_ints(cfg["kernel_size"], 1 if cls == "Conv1D" else 2)))
            groups = int(cfg.get("groups", 1))
            total += size * int(channels or 0) // max(groups, 1) * int(cfg["filters"])
            total += int(cfg["filters"]) if cfg["use_bias"] else 0
        elif cls == "Embedding":
            total += int(cfg["input_dim"]) * int(cfg["output_dim"])
        elif cls in ("LayerNormalization", "GroupNormalization"):
            per = int(bool(cfg.get("center", True))) + int(bool(cfg.get("scale", True)))
            total += per * int(channels or 0)
        try:
            layer = keras.saving.deserialize_keras_object(layer_config, safe_mode=True)
            if cls not in ("Dense", "Conv1D", "Conv2D", "Embedding") and cls not in (
                "LayerNormalization",
                "GroupNormalization",
            ):
                # No closed form: build this one (allowed) layer alone to count its weights.
                layer.build(shape)
                total += int(sum(int(np.prod(w.shape)) for w in layer.weights))
            shape = tuple(layer.compute_output_shape(shape))
        except ModelRefused:
            raise
        except Exception as error:
            name = cfg.get("name")
            raise ModelRefused(f"layer {name!r} ({cls}) refused: invalid config: {error}") from None
        if total > 10**13:  # stop early on absurd declarations (the limit check follows)
            break
    return total


def _seed_initializers(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """Replace every random initializer's seed by one derived from the session seed.

    The ``k``-th layer after the input gets ``seed + k`` for its first initializer slot
    (kernel), ``seed + 1000 + k`` for the next (bias), and so on: for the Dense presets this
    is exactly the seeding of :func:`peer.training.model.build_model` (``seed`` + layer index).
    """
    layers = [x for x in _layer_configs(config) if x.get("class_name") != "InputLayer"]
    for index, layer in enumerate(layers):
        cfg = layer.get("config", {})
        for slot, key in enumerate(_INITIALIZER_KEYS):
            init = cfg.get(key)
            if isinstance(init, str):  # a shorthand like "glorot_uniform": make it explicit
                init = {
                    "module": "keras.initializers",
                    "class_name": init,
                    "config": {},
                    "registered_name": None,
                }
                cfg[key] = init
            if isinstance(init, dict) and _is_random(init):
                init.setdefault("config", {})["seed"] = seed + _SEED_STRIDE * slot + index
    return config


def _is_random(init: Mapping[str, Any]) -> bool:
    """Whether a serialized initializer draws random numbers (and so takes a seed)."""
    import keras

    try:
        instance = keras.initializers.get({**init, "config": {}})
    except Exception as error:
        raise ModelRefused(
            f"model refused: unknown initializer {init.get('class_name')!r}"
        ) from error
    return "seed" in inspect.signature(type(instance).__init__).parameters


def layer_names(model_json: str | Mapping[str, Any]) -> Iterable[str]:
    """Class names of the declared layers, in order (for logs and reports)."""
    return [str(layer.get("class_name")) for layer in _layer_configs(_parse(model_json))]
