"""DP-SGD for declared Sequential models, with a fast per-example gradient norm per layer.

Theory of operation. DP-SGD needs ``||grad_i||`` for every example ``i`` of a batch. No layer
here mixes examples (BatchNormalization is refused), so one ordinary backward pass of the
*summed* loss gives, at every layer output ``z``, the rows ``g_i = dloss_i/dz_i``; each
layer's share of ``||grad_i||^2`` then follows from its input ``a_i`` and ``g_i`` alone:

* **Dense, Conv1D, Conv2D** are linear maps of (unfolded) inputs: with ``A_i`` the ``T x d``
  matrix of example ``i``'s input rows (``T = 1`` for a Dense layer on vectors, ``T`` = output
  positions for a convolution, each row an unfolded patch) and ``G_i`` the ``T x p`` output
  gradients, the kernel gradient is ``A_i^T G_i``. Its squared norm is computed either by
  forming that ``d x p`` matrix per example (cheap when ``d p`` is small, as for the kernels
  of a CNN) or by the *ghost norm* ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` (cheap when ``T^2`` is
  small, as for Dense layers: ``||a_i||^2 ||g_i||^2``), whichever costs less; the bias
  gradient is ``sum_t g_t``.
* **Embedding**: example ``i``'s gradient row for token ``v`` is the sum of ``g_t`` over the
  positions where token ``v`` occurs, so ``||grad||^2 = sum_{t,s: id_t = id_s} g_t . g_s``.
* **LayerNormalization, GroupNormalization**: ``z = gamma * xhat + beta`` per channel, so the
  per-example gradients are the (small, one value per channel) sums over positions of
  ``g * xhat`` and ``g``.
* Pooling, Flatten, Reshape, Activation have no parameters: they only pass ``a`` forward.

Clipping reuses the same pieces: the clipped sum for each layer is the gradient of ``z`` with
respect to the layer's weights with output gradients ``c_i g_i`` (``c_i = min(1, C/norm_i)``),
one more cheap per-layer product, not a second backward pass through the network.

A layer with weights and no fast rule (e.g. a recurrent layer a site chose to allow) is not
refused: its per-example gradients are computed exactly, vectorized over the batch with
``tf.vectorized_map`` from the same ``a_i`` and ``g_i``, and a warning says so in the log.

Noise and normalization are those of :mod:`peer.training.dpsgd`: Gaussian noise of standard
deviation ``sigma C`` on every coordinate of the clipped sum, divided by the expected batch
size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .dpsgd import PoissonTrainer, _f32
from .losses import binary_logit_loss

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["LayerwiseDPSGD", "binary_logit_loss"]

LOG = logging.getLogger(__name__)

_TINY = 1e-12


@dataclass
class _Step:
    """One layer of the plan: how to run it forward and take its share of the norms."""

    layer: Any
    kind: str  # "linear", "embedding", "norm", "free" or "fallback"
    forward: Callable[[Any], tuple[Any, Any]]  # a -> (z, out); z is what g is taken at
    variables: list[Any] = field(default_factory=list)
    unfold: Callable[[Any], Any] | None = None  # linear: a -> A [B, T, d]
    per_kernel: Callable[[Any, Any], Any] | None = None  # conv: (a, g) -> [B, d, p]
    # Tensors of the current trace: "value" (norm layers: xhat, set by forward) and "kernel"
    # (linear layers, materialized per-example kernel gradients, set by the norm rule).
    xhat: dict[str, Any] = field(default_factory=dict)
    linear_norm: str = "auto"  # linear: "auto", "ghost" or "materialize"


class LayerwiseDPSGD(PoissonTrainer):
    """DP-SGD and plain SGD steps for a Sequential Keras model of supported layers.

    Args:
        model: a built Sequential model (e.g. from
            :func:`peer.training.declared.build_declared_model`).
        loss: per-example loss of ``(labels, model output)``; binary logit by default.
        log: where the fallback to exact per-example gradients is reported.
        linear_norm: how Dense/Conv kernel norms are computed: ``"ghost"`` (Gram matrices of
            the positions), ``"materialize"`` (the per-example kernel gradient) or ``"auto"``
            (whichever is smaller for the layer's shapes; both are exact).

    Raises:
        TypeError: the model has a layer that mixes examples or cannot be trained here.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: Callable[[Any, Any], Any] = binary_logit_loss,
        log: logging.Logger = LOG,
        linear_norm: str = "auto",
    ) -> None:
        import tensorflow as tf

        self.model = model
        self._loss = loss
        if linear_norm not in ("auto", "ghost", "materialize"):
            raise ValueError(f"linear_norm must be auto, ghost or materialize, not {linear_norm!r}")
        self._plan = [_plan_layer(layer) for layer in model.layers]
        for step in self._plan:
            step.linear_norm = linear_norm
        self.fallback_layers = [s.layer.name for s in self._plan if s.kind == "fallback"]
        for name in self.fallback_layers:
            log.warning(
                "layer %r has no fast per-example gradient norm rule: DP-SGD uses its exact "
                "per-example gradients (vectorized over the batch), which is slower",
                name,
            )
        self._variables = [v for s in self._plan for v in s.variables]
        if [id(v) for v in self._variables] != [id(v) for v in model.trainable_variables]:
            raise TypeError("the model's trainable variables are not those of its layers")
        self._n_params = sum(int(np.prod(v.shape)) for v in self._variables)
        input_shape = tuple(model.inputs[0].shape)
        self._input_shape = input_shape[1:]
        self._input_dtype = tf.as_dtype(model.inputs[0].dtype)
        x_spec = tf.TensorSpec([None, *self._input_shape], self._input_dtype)
        y_spec = tf.TensorSpec([None], tf.float32)
        scalar = tf.TensorSpec([], tf.float32)
        self._norms = tf.function(self._norms_graph, input_signature=[x_spec, y_spec])
        self._clipped = tf.function(self._clipped_graph, input_signature=[x_spec, y_spec, scalar])
        self._dp_step = tf.function(self._dp_step_graph, reduce_retracing=True)
        self._sgd_step = tf.function(
            self._sgd_step_graph, input_signature=[x_spec, y_spec, scalar, scalar]
        )
        self._run = tf.function(self._run_graph, reduce_retracing=True)

    # ------------------------------------------------------------------ public

    def clipped_sum(
        self, x: npt.ArrayLike, y: npt.ArrayLike, clip_norm: float
    ) -> npt.NDArray[np.float64]:
        """``sum_i clip(grad_i, C)`` as one flat vector in :func:`get_flat_weights` order."""
        flat = self._clipped(*self._tensors(x, y), _f32(clip_norm))
        return np.asarray(flat.numpy(), dtype=np.float64)

    # ------------------------------------------------------------------ graphs

    def _tensors(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[tf.Tensor, tf.Tensor]:
        import tensorflow as tf

        xa = np.asarray(x, dtype=self._input_dtype.as_numpy_dtype)
        ya = np.asarray(y, dtype=np.float32).reshape(-1)
        expected = tuple(d for d in self._input_shape)
        if xa.shape[1:] != expected or xa.shape[0] != ya.shape[0]:
            raise ValueError(
                f"expected inputs (n, {', '.join(map(str, expected))}) and labels (n,), got "
                f"{xa.shape} and {ya.shape}"
            )
        return tf.constant(xa), tf.constant(ya)

    def _forward(self, x: Any, y: Any, tape: Any) -> tuple[Any, list[Any], list[Any]]:
        """Summed loss, every weighted layer's input ``a`` and the tensor ``z`` it is taken at."""
        import tensorflow as tf

        inputs, outputs = [], []
        a = x
        for step in self._plan:
            if step.kind == "free":
                a = step.forward(a)[1]
                continue
            inputs.append(a)
            z, a = step.forward(a)
            outputs.append(z)
        losses = self._loss(y, a)
        del tape  # recorded by the caller's context
        return tf.reduce_sum(losses), inputs, outputs

    def _pieces(self, x: Any, y: Any) -> tuple[Any, list[Any], list[Any], list[Any]]:
        import tensorflow as tf

        for step in self._plan:  # no tensor of an earlier trace may be reused
            step.xhat.clear()
        with tf.GradientTape(persistent=True) as tape:
            total, inputs, outputs = self._forward(x, y, tape)
        grads = tape.gradient(total, outputs)
        return tape, inputs, outputs, grads

    def _weighted(self) -> list[_Step]:
        return [s for s in self._plan if s.kind != "free"]

    def _squared_norms(
        self, inputs: list[Any], grads: list[Any], per_example: dict[int, list[Any]]
    ) -> Any:
        import tensorflow as tf

        squared = tf.zeros(tf.shape(grads[0])[:1], tf.float32)
        for index, (step, a, g) in enumerate(zip(self._weighted(), inputs, grads, strict=True)):
            if step.kind == "fallback":
                per_example[index] = _per_example_grads(step, a, g)
                for pg in per_example[index]:
                    squared += tf.reduce_sum(tf.reshape(tf.square(pg), [tf.shape(pg)[0], -1]), 1)
            else:
                squared += _RULES[step.kind](step, a, g)
        return squared

    def _norms_graph(self, x: Any, y: Any) -> Any:
        import tensorflow as tf

        _, inputs, _, grads = self._pieces(x, y)
        return tf.sqrt(self._squared_norms(inputs, grads, {}))

    def _clipped_grads(self, x: Any, y: Any, clip: Any) -> list[Any]:
        """``sum_i c_i grad_i`` for every trainable variable, in model order."""
        import tensorflow as tf

        tape, inputs, outputs, grads = self._pieces(x, y)
        per_example: dict[int, list[Any]] = {}
        norms = tf.sqrt(self._squared_norms(inputs, grads, per_example))
        factors = tf.minimum(1.0, clip / tf.maximum(norms, _TINY))
        result: list[Any] = []
        for index, (step, z, g) in enumerate(zip(self._weighted(), outputs, grads, strict=True)):
            if step.kind == "fallback":
                result += [tf.tensordot(factors, pg, 1) for pg in per_example[index]]
                continue
            if "kernel" in step.xhat:
                kernel = tf.tensordot(factors, step.xhat.pop("kernel"), 1)
                result.append(tf.reshape(kernel, step.variables[0].shape))
                if len(step.variables) > 1:
                    per_bias = tf.reduce_sum(tf.reshape(g, [tf.shape(g)[0], -1, g.shape[-1]]), 1)
                    result.append(tf.tensordot(factors, per_bias, 1))
                continue
            shape = [-1] + [1] * (len(g.shape) - 1)
            weighted = g * tf.reshape(factors, shape)
            for grad in tape.gradient(z, step.variables, output_gradients=weighted):
                result.append(tf.convert_to_tensor(grad))
        del tape
        return result

    def _clipped_graph(self, x: Any, y: Any, clip: Any) -> Any:
        import tensorflow as tf

        return tf.concat([tf.reshape(g, [-1]) for g in self._clipped_grads(x, y, clip)], 0)

    def _dp_step_graph(
        self, x: Any, y: Any, lr: Any, clip: Any, noise_std: Any, denom: Any, generator: Any
    ) -> None:
        import tensorflow as tf

        grads = self._clipped_grads(x, y, clip)
        noise = generator.normal([self._n_params], dtype=tf.float32) * noise_std
        scale = lr / denom
        offset = 0
        for variable, grad in zip(self._variables, grads, strict=True):
            size = int(np.prod(variable.shape))
            draw = tf.reshape(noise[offset : offset + size], variable.shape)
            variable.assign_sub(scale * (grad + draw))
            offset += size

    def _sgd_step_graph(self, x: Any, y: Any, lr: Any, denom: Any) -> None:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            total, _, _ = self._forward(x, y, tape)
        scale = lr / denom
        for variable, grad in zip(
            self._variables, tape.gradient(total, self._variables), strict=True
        ):
            variable.assign_sub(scale * tf.convert_to_tensor(grad))


# ---------------------------------------------------------------------- per-layer rules


def _plan_layer(layer: Any) -> _Step:
    import keras
    import tensorflow as tf

    name = f"{layer.name!r} ({type(layer).__name__})"
    if layer.non_trainable_weights:
        raise TypeError(
            f"layer {name} has non-trainable state (e.g. BatchNormalization statistics), "
            "which mixes examples or leaks batch data; it cannot be trained with DP-SGD here"
        )
    if not layer.trainable_weights:
        return _Step(layer, "free", lambda a: (None, layer(a)))
    variables = list(layer.trainable_variables)
    activation = getattr(layer, "activation", None)

    def act(z: Any) -> Any:
        return z if activation is None else activation(z)

    if isinstance(layer, keras.layers.Dense) and not getattr(layer, "lora_enabled", False):
        kernel, bias = layer.kernel.value, layer.bias.value if layer.use_bias else None

        def dense(a: Any) -> tuple[Any, Any]:
            z = tf.matmul(a, kernel) if len(a.shape) == 2 else tf.tensordot(a, kernel, 1)
            z = z if bias is None else z + bias
            return z, act(z)

        def unfold(a: Any) -> Any:
            return tf.reshape(a, [tf.shape(a)[0], -1, kernel.shape[0]])

        return _Step(layer, "linear", dense, variables, unfold)

    conv_types = (keras.layers.Conv1D, keras.layers.Conv2D)
    if (
        isinstance(layer, conv_types)
        and type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D)
        and layer.groups == 1
        and layer.padding in ("valid", "same")
        and layer.data_format == "channels_last"
    ):
        return _conv_step(layer, variables, act)

    if isinstance(layer, keras.layers.Embedding) and layer.mask_zero:
        # Keras would pass a mask to the following layers; this trainer runs them without.
        raise TypeError(f"layer {name}: mask_zero=True is not supported by DP-SGD here")
    if isinstance(layer, keras.layers.Embedding):
        table = layer.embeddings.value

        def embed(a: Any) -> tuple[Any, Any]:
            z = tf.gather(table, tf.cast(a, tf.int32))
            return z, z

        return _Step(layer, "embedding", embed, variables)

    if isinstance(layer, keras.layers.LayerNormalization) and not layer.rms_scaling:
        return _norm_step(layer, variables, groups=None)
    if isinstance(layer, keras.layers.GroupNormalization):
        return _norm_step(layer, variables, groups=int(layer.groups))

    def fallback(a: Any) -> tuple[Any, Any]:
        out = layer(a)
        return out, out

    return _Step(layer, "fallback", fallback, variables)


def _conv_step(layer: Any, variables: list[Any], act: Callable[[Any], Any]) -> _Step:
    import tensorflow as tf

    one_d = len(layer.kernel.shape) == 3
    kernel = layer.kernel.value
    bias = layer.bias.value if layer.use_bias else None
    kh, kw = (1, layer.kernel_size[0]) if one_d else tuple(layer.kernel_size)
    sh, sw = (1, layer.strides[0]) if one_d else tuple(layer.strides)
    dh, dw = (1, layer.dilation_rate[0]) if one_d else tuple(layer.dilation_rate)
    padding = layer.padding.upper()

    def as_2d(a: Any) -> Any:
        return a[:, None] if one_d else a

    def conv(a: Any) -> tuple[Any, Any]:
        k = kernel[None] if one_d else kernel
        # tf.nn.convolution, not conv2d: conv2d's gradient to its input has no CPU kernel for
        # dilation > 1 (a dilated Conv1D after a trainable layer failed every DP step);
        # convolution computes a dilated one through space-to-batch, as Keras does.
        z = tf.nn.convolution(as_2d(a), k, [sh, sw], padding, dilations=[dh, dw])
        z = z[:, 0] if one_d else z
        z = z if bias is None else z + bias
        return z, act(z)

    def unfold(a: Any) -> Any:
        # Rows of (kh, kw, C) patches, the order of the kernel reshaped to (kh kw C, F).
        patches = tf.image.extract_patches(
            as_2d(a), [1, kh, kw, 1], [1, sh, sw, 1], [1, dh, dw, 1], padding
        )
        return tf.reshape(patches, [tf.shape(a)[0], -1, patches.shape[-1]])

    def per_kernel(a: Any, g: Any) -> Any:
        """Per-example kernel gradients [B, kh kw C, F], one shifted slice of ``a`` per tap.

        Measured here: an order of magnitude faster than unfolding with extract_patches
        (which dominated the DP step of the benchmark CNN).
        """
        a2, g2 = as_2d(a), as_2d(g)
        out_h, out_w, channels = g2.shape[1], g2.shape[2], a2.shape[3]
        if padding == "SAME":
            pads = [[0, 0]]
            for size, out, k, s, d in (
                (a2.shape[1], out_h, kh, sh, dh),
                (a2.shape[2], out_w, kw, sw, dw),
            ):
                total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
                pads.append([total // 2, total - total // 2])
            a2 = tf.pad(a2, [*pads, [0, 0]])
        batch = tf.shape(a)[0]
        grads = tf.reshape(g2, [batch, -1, g2.shape[3]])
        taps = []
        for u in range(kh):
            for v in range(kw):
                rows = a2[:, u * dh : u * dh + (out_h - 1) * sh + 1 : sh]
                window = rows[:, :, v * dw : v * dw + (out_w - 1) * sw + 1 : sw]
                window = tf.reshape(window, [batch, -1, channels])
                taps.append(tf.matmul(window, grads, transpose_a=True))  # [B, C, F]
        return tf.reshape(tf.stack(taps, 1), [batch, kh * kw * channels, g2.shape[3]])

    return _Step(layer, "linear", conv, variables, unfold, per_kernel)


def _norm_step(layer: Any, variables: list[Any], groups: int | None) -> _Step:
    import tensorflow as tf

    axis = layer.axis if isinstance(layer.axis, int) else None
    if groups is None and isinstance(layer.axis, list | tuple) and len(layer.axis) == 1:
        axis = layer.axis[0]
    gamma = layer.gamma.value if layer.scale else None
    beta = layer.beta.value if layer.center else None
    step = _Step(layer, "norm", lambda a: (None, None), variables)

    def forward(a: Any) -> tuple[Any, Any]:
        rank = len(a.shape)
        if axis not in (-1, rank - 1):
            raise TypeError(f"layer {layer.name!r}: only the last axis is supported")
        if groups is None:
            mean, var = tf.nn.moments(a, axes=[rank - 1], keepdims=True)
            xhat = (a - mean) * tf.math.rsqrt(var + layer.epsilon)
        else:
            channels = int(a.shape[-1])
            grouped = tf.reshape(a, tf.concat([tf.shape(a)[:-1], [groups, channels // groups]], 0))
            axes = [*range(1, rank - 1), rank]
            mean, var = tf.nn.moments(grouped, axes=axes, keepdims=True)
            xhat = tf.reshape((grouped - mean) * tf.math.rsqrt(var + layer.epsilon), tf.shape(a))
        step.xhat["value"] = xhat
        z = xhat
        if gamma is not None:
            z = z * gamma
        if beta is not None:
            z = z + beta
        return z, z

    step.forward = forward
    return step


def _linear_sq(step: _Step, a: Any, g: Any) -> Any:
    import tensorflow as tf

    assert step.unfold is not None
    big_g = tf.reshape(g, [tf.shape(g)[0], -1, g.shape[-1]])  # [B, T, p]
    positions, p = big_g.shape[1], big_g.shape[2]
    d = int(np.prod(step.variables[0].shape)) // p  # kernel fan-in (kh kw C for a conv)
    mode = step.linear_norm
    if mode == "auto":
        small_gram = positions is not None and positions * positions < d * p
        mode = "ghost" if positions == 1 or small_gram else "materialize"
    if positions == 1:
        big_a = step.unfold(a)  # [B, 1, d]
        kernel = tf.reduce_sum(tf.square(big_a[:, 0]), 1) * tf.reduce_sum(tf.square(big_g[:, 0]), 1)
    elif mode == "ghost":
        # Ghost norm: sum_{t,s} (a_t . a_s)(g_t . g_s), never forming the d x p gradient.
        big_a = step.unfold(a)  # [B, T, d]
        gram_a = tf.matmul(big_a, big_a, transpose_b=True)
        gram_g = tf.matmul(big_g, big_g, transpose_b=True)
        kernel = tf.reduce_sum(gram_a * gram_g, axis=[1, 2])
    else:
        # The d x p per-example kernel gradient is smaller than the T x T Gram matrices.
        if step.per_kernel is not None:
            per_example = step.per_kernel(a, g)
        else:
            per_example = tf.matmul(step.unfold(a), big_g, transpose_a=True)  # [B, d, p]
        # Kept for the clipped sum, sum_i c_i A_i^T G_i: a weighted sum of these (B d p
        # operations) instead of a second backward product over all positions.
        step.xhat["kernel"] = per_example
        kernel = tf.reduce_sum(tf.square(per_example), [1, 2])
    if len(step.variables) > 1:  # the bias
        kernel += tf.reduce_sum(tf.square(tf.reduce_sum(big_g, 1)), 1)
    return kernel


def _embedding_sq(step: _Step, a: Any, g: Any) -> Any:
    import tensorflow as tf

    ids = tf.reshape(tf.cast(a, tf.int32), [tf.shape(a)[0], -1])  # [B, T]
    big_g = tf.reshape(g, [tf.shape(g)[0], -1, g.shape[-1]])  # [B, T, D]
    same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), g.dtype)
    return tf.reduce_sum(same * tf.matmul(big_g, big_g, transpose_b=True), axis=[1, 2])


def _norm_sq(step: _Step, a: Any, g: Any) -> Any:
    import tensorflow as tf

    del a
    layer = step.layer
    positions = list(range(1, len(g.shape) - 1))
    squared = tf.zeros(tf.shape(g)[:1], g.dtype)
    if layer.scale:
        per_gamma = tf.reduce_sum(g * step.xhat["value"], axis=positions)
        squared += tf.reduce_sum(tf.square(per_gamma), 1)
    if layer.center:
        squared += tf.reduce_sum(tf.square(tf.reduce_sum(g, axis=positions)), 1)
    return squared


_RULES: dict[str, Callable[[_Step, Any, Any], Any]] = {
    "linear": _linear_sq,
    "embedding": _embedding_sq,
    "norm": _norm_sq,
}


def _per_example_grads(step: _Step, a: Any, g: Any) -> list[Any]:
    """Exact per-example weight gradients of one layer, vectorized over the batch."""
    import tensorflow as tf

    layer = step.layer

    def one(pair: tuple[Any, Any]) -> list[Any]:
        a_i, g_i = pair
        with tf.GradientTape() as tape:
            out = layer(a_i[None])
        return [
            tf.convert_to_tensor(grad)
            for grad in tape.gradient(out, step.variables, output_gradients=g_i[None])
        ]

    result: list[Any] = tf.vectorized_map(one, (a, g))
    return result
