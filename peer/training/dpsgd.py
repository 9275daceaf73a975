"""DP-SGD for Dense-only Keras models, written directly in TensorFlow.

Theory of operation. For a Dense layer ``z = a W + b`` the gradient of example ``i``'s loss is
``a_i g_i^T`` for ``W`` and ``g_i`` for ``b``, where ``g_i = dloss_i/dz_i``. Hence

    ||grad_i||^2 = sum over layers of (||a_i||^2 + 1) * ||g_i||^2

and the per-example norms need only the layer inputs ``a`` and the output gradients ``g``,
which one ordinary backward pass (of the summed loss, with respect to every ``z``) provides;
no per-example gradient is ever materialized. With clip factors ``c_i = min(1, C / norm_i)``
the clipped sum is ``a^T (c * g)`` for ``W`` and ``sum_i c_i g_i`` for ``b``: the same pieces
reused, so one forward and one backward pass suffice (a second backward pass of
``sum_i c_i loss_i`` would give the same result at twice the cost). Then Gaussian noise
``N(0, (sigma C)^2)`` is added to each coordinate of the clipped sum, and the result is
divided by the *expected* batch size ``q N``, as Poisson-sampled DP-SGD requires (dividing by
the realised batch size would leak it).

Compiled steps, padded batches. For small models (``XLA_MAX_PARAMETERS``, see
:class:`DPSGD`'s ``xla``) every step runs in one XLA-compiled loop over batches padded to a few
sizes, with a 0/1 weight per row, which computes the same function of the sampled examples
and leaves sampling, clipping, noise, normalization and the privacy accounting unchanged:
:mod:`peer.training.padded_xla` says why.

Randomness. The Poisson sampling and the noise both come from a ``tf.random.Generator``
(Philox) that is an explicit argument. :func:`secure_generator` seeds one from ``os.urandom``;
tests inject a fixed one. The noise must be unpredictable to the other hospitals, so never
seed a real peer's generator from anything shared (the session seed is shared). The samples and
noise of a chunk of steps are drawn outside XLA from that generator, in the same order as
the uncompiled loop draws them (TensorFlow's CPU kernel for the Gaussian is several times
faster than XLA's random number generation here), and fed to the compiled loop.

This is exact only because no layer mixes examples (no BatchNorm) and every layer with weights
is Dense; :func:`peer.training.model.dense_layers` enforces that.
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .losses import Loss, binary_logit_loss
from .model import dense_layers
from .padded_xla import PaddedXLALoop
from .run_args import RunArgs

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["DPSGD", "secure_generator", "trainer_for"]

# Guards the division C / norm for examples whose gradient is exactly zero.
_TINY = 1e-12


def secure_generator(seed: bytes | None = None) -> tf.random.Generator:
    """A Philox generator whose whole 192-bit state comes from ``seed`` or ``os.urandom``.

    Args:
        seed: bytes to derive the state from (tests only); None uses 32 bytes of OS entropy.
    """
    import tensorflow as tf

    material = hashlib.sha256(b"peer/training/noise-generator/v1" + (seed or os.urandom(32)))
    words = np.frombuffer(material.digest()[:24], dtype="<i8").copy()
    return tf.random.Generator.from_state(words, alg="philox")


class PoissonTrainer:
    """What every DP-SGD trainer shares: the public steps (:meth:`dp_step`, :meth:`sgd_step`,
    :meth:`per_example_norms`) and :meth:`run`, Poisson-sampled steps in one compiled loop,
    with the argument checks the privacy accountant relies on. A trainer provides
    ``_tensors`` (its input conversion) and its compiled graphs (``_dp_step``, ``_sgd_step``,
    ``_norms``, ``_run``)."""

    _run: Callable[..., Any]
    _dp_step: Callable[..., Any]
    _sgd_step: Callable[..., Any]
    _norms: Callable[..., Any]
    _variables: list[Any]  # the trainable variables, in get_flat_weights order

    def _dp_step_graph(
        self, x: Any, y: Any, lr: Any, clip: Any, noise_std: Any, denom: Any, generator: Any
    ) -> None:
        raise NotImplementedError

    def _sgd_step_graph(self, x: Any, y: Any, lr: Any, denom: Any) -> None:
        raise NotImplementedError

    def _tensors(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def per_example_norms(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The L2 norm of each example's full gradient (all layers), before clipping."""
        return np.asarray(self._norms(*self._tensors(x, y)).numpy(), dtype=np.float32)

    def dp_step(
        self,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        *,
        lr: float,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        generator: tf.random.Generator,
    ) -> None:
        """One DP-SGD step on the given batch (already sampled by the caller).

        ``w -= lr * (sum_i clip(grad_i, C) + N(0, (sigma C)^2 I)) / expected_batch_size``.
        """
        _check_dp(clip_norm, noise_multiplier, expected_batch_size)
        self._dp_step(
            *self._tensors(x, y),
            _f32(lr),
            _f32(clip_norm),
            _f32(noise_multiplier * clip_norm),
            _f32(expected_batch_size),
            generator=generator,
        )

    def sgd_step(
        self, x: npt.ArrayLike, y: npt.ArrayLike, *, lr: float, expected_batch_size: float
    ) -> None:
        """One plain (non-private) SGD step: ``w -= lr * sum_i grad_i / expected_batch_size``."""
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be positive, not {expected_batch_size}")
        self._sgd_step(*self._tensors(x, y), _f32(lr), _f32(expected_batch_size))

    def run(
        self,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        *,
        steps: int,
        sampling_rate: float,
        lr: float,
        clip_norm: float | None,
        noise_multiplier: float,
        generator: tf.random.Generator,
        prox_mu: float = 0.0,
    ) -> int:
        """``steps`` Poisson-sampled steps over ``(x, y)`` in one compiled loop.

        Each example joins each batch independently with probability ``sampling_rate``
        (the sampling that the privacy accountant assumes). ``clip_norm=None`` runs plain SGD
        with the same sampling and normalization.

        ``prox_mu > 0`` is FedProx: each step also moves the weights by
        ``-lr * prox_mu * (w_t - w_0)``, the gradient of ``prox_mu/2 ||w - w_0||^2`` at the
        step's starting point, ``w_0`` being the weights this run started from (the global
        model). It is added *after* clipping and noising and is not clipped: it depends on no
        record, only on ``w_t`` (itself a function of earlier noisy steps) and the public
        ``w_0``, so each step is still the Gaussian mechanism on the same clipped sum followed
        by post-processing; the noise, the sensitivity ``C`` and the privacy accounting are
        exactly those of DP-SGD without it. ``prox_mu = 0`` runs DP-SGD unchanged.

        Returns:
            the total number of examples in all sampled batches.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, not {steps}")
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling rate must be in (0, 1], not {sampling_rate}")
        xt, yt = self._tensors(x, y)
        n = int(xt.shape[0])
        if n == 0:
            raise ValueError("cannot train on an empty data set")
        private = clip_norm is not None
        clip = clip_norm if clip_norm is not None else 1.0
        if private:
            _check_dp(clip, noise_multiplier, sampling_rate * n)
        if not (math.isfinite(prox_mu) and prox_mu >= 0):
            raise ValueError(f"prox_mu must be finite and >= 0, not {prox_mu}")
        import tensorflow as tf

        args = RunArgs(
            x=xt,
            y=yt,
            steps=tf.constant(steps, tf.int32),
            rate=_f32(sampling_rate),
            lr=_f32(lr),
            clip=_f32(clip),
            noise_std=_f32(noise_multiplier * clip if private else 0.0),
            denom=_f32(sampling_rate * n),
            prox_mu=_f32(prox_mu),
            private=private,
            proximal=prox_mu > 0,
        )
        total = self._run(args, generator=generator)
        return int(total.numpy())

    def _run_graph(self, args: RunArgs, generator: Any) -> Any:
        import tensorflow as tf

        n = tf.shape(args.x)[0]
        total = tf.constant(0, tf.int64)
        anchors = (
            [tf.identity(tf.convert_to_tensor(v)) for v in self._variables] if args.proximal else []
        )
        for _ in tf.range(args.steps):
            chosen = tf.where(generator.uniform([n], dtype=tf.float32) < args.rate)[:, 0]
            xb, yb = tf.gather(args.x, chosen), tf.gather(args.y, chosen)
            # FedProx's pull is taken at the step's starting point (read before the step).
            pulls = (
                [args.prox_mu * (v - a) for v, a in zip(self._variables, anchors, strict=True)]
                if args.proximal
                else []
            )
            if args.private:
                self._dp_step_graph(
                    xb, yb, args.lr, args.clip, args.noise_std, args.denom, generator
                )
            else:
                self._sgd_step_graph(xb, yb, args.lr, args.denom)
            for variable, pull in zip(self._variables, pulls, strict=False):
                variable.assign_sub(args.lr * pull)
            total += tf.size(chosen, out_type=tf.int64)
        return total


class DPSGD(PaddedXLALoop, PoissonTrainer):
    """Compiled DP-SGD and plain SGD steps for one Dense-only Keras model.

    Build it once per model (see :func:`trainer_for`) and reuse it: the TensorFlow graphs
    are traced on first use, and XLA compiles the step loop once per data set size, chunk
    length and padded batch size. Every method updates the model's weights in place.

    Args:
        model: a model built by :func:`peer.training.model.build_model` (or any model whose
            weighted layers are biased Dense layers).
        loss: per-example loss of ``(labels, last layer's output)``
            (:mod:`peer.training.losses`); binary logit by default.
        xla: run the steps in the padded, XLA-compiled loop (:mod:`.padded_xla`) or in
            :class:`PoissonTrainer`'s graph loop of unpadded batches. None (default) picks
            XLA for models of at most ``XLA_MAX_PARAMETERS`` parameters, whose steps are
            mostly TensorFlow's per-operation overhead, which XLA removes; larger models
            are dominated by their matrix products, which TensorFlow's own (oneDNN) kernels
            do faster than XLA's here, and they would pay for the padding.
    """

    def __init__(
        self, model: keras.Model, loss: Loss = binary_logit_loss, xla: bool | None = None
    ) -> None:
        import tensorflow as tf

        self.model = model
        self._loss = loss
        layers = dense_layers(model)
        self._kernels = [layer.kernel.value for layer in layers]
        self._biases = [layer.bias.value for layer in layers]
        self._variables = [
            v for pair in zip(self._kernels, self._biases, strict=True) for v in pair
        ]
        self._activations: list[Callable[[Any], Any]] = [layer.activation for layer in layers]
        self._n_features = int(self._kernels[0].shape[0])
        self._n_params = sum(int(np.prod(v.shape)) for v in self._kernels + self._biases)
        x_spec = tf.TensorSpec([None, self._n_features], tf.float32)
        y_spec = tf.TensorSpec([None], tf.float32)
        self._norms = tf.function(self._norms_graph, input_signature=[x_spec, y_spec])
        self.xla = self._n_params <= XLA_MAX_PARAMETERS if xla is None else xla
        # The public steps of PoissonTrainer call these three.
        if self.xla:
            self._dp_step = self._padded_dp_step
            self._sgd_step = self._padded_sgd_step
            self._run = self._padded_run
        else:
            scalar = tf.TensorSpec([], tf.float32)
            self._dp_step = tf.function(self._dp_step_graph, reduce_retracing=True)
            self._sgd_step = tf.function(
                self._sgd_step_graph, input_signature=[x_spec, y_spec, scalar, scalar]
            )
            self._run = tf.function(self._run_graph, reduce_retracing=True)
        self._compile_padded_loop()

    # ------------------------------------------------------------------ public steps

    def clipped_sum(
        self, x: npt.ArrayLike, y: npt.ArrayLike, clip_norm: float
    ) -> npt.NDArray[np.float64]:
        """``sum_i clip(grad_i, C)`` as one flat vector (layer by layer, kernel then bias),
        without noise: for distributed noise, where each hospital adds only a share."""
        import tensorflow as tf

        _, inputs, grads = self._forward_pieces(*self._tensors(x, y))
        norms = tf.sqrt(self._squared_norms(inputs, grads))
        factors = tf.minimum(1.0, clip_norm / tf.maximum(norms, _TINY))[:, None]
        parts = []
        for a, g in zip(inputs, grads, strict=True):
            clipped = g * factors
            parts.append(tf.reshape(tf.matmul(a, clipped, transpose_a=True), [-1]))
            parts.append(tf.reduce_sum(clipped, axis=0))
        return np.concatenate([np.asarray(p.numpy(), dtype=np.float64) for p in parts])

    # ------------------------------------------------------------------ step pieces

    def _tensors(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[tf.Tensor, tf.Tensor]:
        import tensorflow as tf

        xa = np.asarray(x, dtype=np.float32)
        ya = np.asarray(y, dtype=np.float32).reshape(-1)
        if xa.ndim != 2 or xa.shape[1] != self._n_features or xa.shape[0] != ya.shape[0]:
            raise ValueError(
                f"expected features (n, {self._n_features}) and labels (n,), got {xa.shape} "
                f"and {ya.shape}"
            )
        return tf.constant(xa), tf.constant(ya)

    def _forward_pieces(
        self, x: Any, y: Any, weights: Any = None
    ) -> tuple[Any, list[Any], list[Any]]:
        """Per-example losses, every layer's input ``a`` and the gradients ``g`` at its ``z``
        (rows of zero weight get ``g = 0`` exactly)."""
        import tensorflow as tf

        with tf.GradientTape() as tape:
            inputs, outputs = [], []
            a = x
            last = len(self._kernels) - 1
            for i, (kernel, bias, act) in enumerate(
                zip(self._kernels, self._biases, self._activations, strict=True)
            ):
                inputs.append(a)
                z = tf.matmul(a, kernel) + bias
                outputs.append(z)
                a = z if i == last else act(z)
            losses = self._loss(y, a)
            total = tf.reduce_sum(losses if weights is None else losses * weights)
        # The summed loss's gradient at z has row i equal to w_i dloss_i/dz_i, because no
        # layer mixes examples.
        grads = tape.gradient(total, outputs)
        return losses, inputs, grads

    @staticmethod
    def _squared_norms(inputs: list[Any], grads: list[Any]) -> Any:
        import tensorflow as tf

        squared = tf.zeros_like(grads[0][:, 0])
        for a, g in zip(inputs, grads, strict=True):
            squared += (tf.reduce_sum(tf.square(a), axis=1) + 1.0) * tf.reduce_sum(
                tf.square(g), axis=1
            )
        return squared

    def _norms_graph(self, x: Any, y: Any) -> Any:
        import tensorflow as tf

        _, inputs, grads = self._forward_pieces(x, y)
        return tf.sqrt(self._squared_norms(inputs, grads))

    def _apply_dp(
        self,
        x: Any,
        y: Any,
        weights: Any,
        normal: Any,
        lr: Any,
        clip: Any,
        noise_std: Any,
        denom: Any,
    ) -> None:
        import tensorflow as tf

        _, inputs, grads = self._forward_pieces(x, y, weights)
        norms = tf.sqrt(self._squared_norms(inputs, grads))
        factors = tf.minimum(1.0, clip / tf.maximum(norms, _TINY))[:, None]
        scale = lr / denom
        # ``normal``: this step's N(0, 1) draw for the whole parameter vector.
        noise = noise_std * normal
        offset = 0
        for a, g, kernel, bias in zip(inputs, grads, self._kernels, self._biases, strict=True):
            clipped = g * factors
            fan_in, fan_out = kernel.shape
            size = fan_in * fan_out
            grad_w = tf.matmul(a, clipped, transpose_a=True)
            grad_w += tf.reshape(noise[offset : offset + size], (fan_in, fan_out))
            grad_b = tf.reduce_sum(clipped, axis=0) + noise[offset + size : offset + size + fan_out]
            offset += size + fan_out
            kernel.assign_sub(scale * grad_w)
            bias.assign_sub(scale * grad_b)

    def _dp_step_graph(
        self, x: Any, y: Any, lr: Any, clip: Any, noise_std: Any, denom: Any, generator: Any
    ) -> None:
        import tensorflow as tf

        normal = generator.normal([self._n_params], dtype=tf.float32)
        self._apply_dp(x, y, None, normal, lr, clip, noise_std, denom)

    def _sgd_step_graph(self, x: Any, y: Any, lr: Any, denom: Any) -> None:
        self._apply_sgd(x, y, None, lr, denom)

    def _apply_sgd(self, x: Any, y: Any, weights: Any, lr: Any, denom: Any) -> None:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            a = x
            last = len(self._kernels) - 1
            for i, (kernel, bias, act) in enumerate(
                zip(self._kernels, self._biases, self._activations, strict=True)
            ):
                z = tf.matmul(a, kernel) + bias
                a = z if i == last else act(z)
            losses = self._loss(y, a)
            total = tf.reduce_sum(losses if weights is None else losses * weights)
        scale = lr / denom
        variables = self._variables
        for variable, grad in zip(variables, tape.gradient(total, variables), strict=True):
            variable.assign_sub(scale * grad)


# DPSGD's default: XLA up to this many parameters (see its ``xla`` argument).
XLA_MAX_PARAMETERS = 1 << 17

_TRAINERS: weakref.WeakKeyDictionary[Any, DPSGD] = weakref.WeakKeyDictionary()


def trainer_for(model: keras.Model, loss: Loss = binary_logit_loss) -> DPSGD:
    """The (cached) :class:`DPSGD` of ``model`` and ``loss``, so its graphs are traced once."""
    trainer = _TRAINERS.get(model)
    if trainer is None or trainer._loss is not loss:
        trainer = DPSGD(model, loss)
        _TRAINERS[model] = trainer
    return trainer


def _check_dp(clip_norm: float, noise_multiplier: float, expected_batch_size: float) -> None:
    if not clip_norm > 0 or not np.isfinite(clip_norm):
        raise ValueError(f"clip norm must be positive and finite, not {clip_norm}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be >= 0, not {noise_multiplier}")
    if not expected_batch_size > 0:
        raise ValueError(f"expected batch size must be positive, not {expected_batch_size}")


def _f32(value: float) -> tf.Tensor:
    import tensorflow as tf

    return tf.constant(value, tf.float32)
