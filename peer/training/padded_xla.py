"""The padded, XLA-compiled step loop of :class:`peer.training.dpsgd.DPSGD`.

For small models (``XLA_MAX_PARAMETERS``, see :class:`~peer.training.dpsgd.DPSGD`'s
``xla``) every step (:meth:`DPSGD.run`, ``dp_step``, ``sgd_step``) runs in
one XLA-compiled loop (``jit_compile``), plain SGD as well as DP-SGD, which removes
TensorFlow's per-operation overhead (most of a small model's step). XLA compiles per input
shape, and Poisson sampling gives every step a different batch size, so the batches of a run
are *padded*: all steps of a chunk share the size ``B = bucket(largest sampled batch)`` (4
sizes per doubling, at most 25 % padding), and a 0/1 weight per row multiplies the
per-example loss. A padded row's loss gradient is then exactly zero, hence its norm is zero,
its clip factor 1 and its contribution to the clipped sum exactly zero: the step is the same
function of the sampled examples as without padding (``tests/test_training_dpsgd.py`` checks
the weights agree). Sampling, clipping, noise and normalization are unchanged: each example
joins each step independently with probability ``q`` (drawn outside XLA, as before), the
noise ``N(0, (sigma C)^2)`` is added to every coordinate of the clipped sum whatever the
batch size, and the divisor is still the expected batch size ``q N``, never ``B`` nor the
realised size. So the privacy accounting (Poisson subsampled Gaussian, same ``q``, ``sigma``,
steps) is untouched; ``B`` is never released (only the weights are).

How the samples and noise reach the compiled loop: :mod:`peer.training.dpsgd`, "Randomness".
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run_args import RunArgs

__all__ = ["PaddedXLALoop"]


class PaddedXLALoop:
    """The padded XLA loop as a mixin of :class:`peer.training.dpsgd.DPSGD`: its ``run``,
    ``dp_step`` and ``sgd_step`` (``_padded_run``, ``_padded_dp_step``,
    ``_padded_sgd_step``). The trainer provides its variables, its parameter count and the
    step pieces ``_apply_dp`` and ``_apply_sgd`` (which take a 0/1 weight per row), and calls
    :meth:`_compile_padded_loop` once."""

    _variables: list[Any]  # the trainable variables, in get_flat_weights order
    _n_params: int

    # The trainer's step pieces: one DP-SGD or SGD update from rows weighted 0 or 1.
    _apply_dp: Callable[..., None]
    _apply_sgd: Callable[..., None]

    def _compile_padded_loop(self) -> None:
        import tensorflow as tf

        # The generator is a traced argument (one trace per generator); reduce_retracing
        # makes the shapes dynamic, so a new data set size does not retrace.
        self._chunk = tf.function(self._chunk_graph, reduce_retracing=True)
        self._compiled = tf.function(self._steps_graph, jit_compile=True, reduce_retracing=True)

    def _padded_run(self, args: RunArgs, generator: Any) -> Any:
        """:meth:`~peer.training.dpsgd.PoissonTrainer.run`'s loop: chunks of steps, each
        sampled outside XLA and run padded to one batch size inside it. Returns the number of
        sampled examples."""
        import tensorflow as tf

        n, steps = int(args.x.shape[0]), int(args.steps)
        # Bounds the [chunk, n] sampling mask and the [chunk, parameters] noise to 2^22
        # values (16 MB) each.
        chunk = max(1, min(steps, _CHUNK_BUDGET // max(n, self._n_params)))
        # FedProx pulls towards the weights the whole run started from, not the chunk's.
        anchors = (
            [tf.identity(tf.convert_to_tensor(v)) for v in self._variables] if args.proximal else []
        )
        total = tf.constant(0, tf.int64)
        for done in range(0, steps, chunk):
            total += self._chunk(
                args,
                tf.constant(min(chunk, steps - done)),
                tf.constant(chunk),
                anchors,
                generator=generator,
            )
        return total

    def _chunk_graph(
        self, args: RunArgs, active: Any, chunk: Any, anchors: list[Any], generator: Any
    ) -> Any:
        """One chunk of :meth:`_padded_run`: sample ``active`` steps (in this graph), pad them
        to one batch size and run them in the XLA loop (compiled for that size on first
        use). Returns the number of sampled examples."""
        import tensorflow as tf

        noise_size = self._n_params if args.private else 0
        masks, counts, noise = self._sample_graph(
            generator, tf.shape(args.x)[0], args.rate, active, noise_size
        )
        table = tf.constant(_BUCKETS, tf.int32)
        largest = tf.reshape(tf.reduce_max(counts), [1])
        size = tf.gather(table, tf.searchsorted(table, largest, side="left"))[0]
        rows, weights = _pad_batches(masks, size, chunk)
        noise = tf.pad(noise, [[0, chunk - active], [0, 0]])
        self._compiled(
            args.x,
            args.y,
            rows,
            weights,
            noise,
            active,
            args.lr,
            args.clip,
            args.noise_std,
            args.denom,
            args.prox_mu,
            anchors,
            args.private,
            args.proximal,
        )
        return tf.reduce_sum(tf.cast(counts, tf.int64))

    def _padded_dp_step(
        self, x: Any, y: Any, lr: Any, clip: Any, noise_std: Any, denom: Any, generator: Any
    ) -> None:
        import tensorflow as tf

        noise = generator.normal([1, self._n_params], dtype=tf.float32)
        self._padded_step(x, y, noise, lr, clip, noise_std, denom, private=True)

    def _padded_sgd_step(self, x: Any, y: Any, lr: Any, denom: Any) -> None:
        import tensorflow as tf

        zero = tf.constant(0.0)
        noise = tf.zeros([1, 0])  # plain SGD draws no noise
        self._padded_step(x, y, noise, lr, zero, zero, denom, private=False)

    def _padded_step(
        self,
        x: Any,
        y: Any,
        noise: Any,
        lr: Any,
        clip: Any,
        noise_std: Any,
        denom: Any,
        private: bool,
    ) -> None:
        """One step on the whole batch ``(x, y)``, padded to its bucket size."""
        import tensorflow as tf

        rows, weights = _pad_batches(tf.ones([1, x.shape[0]], tf.bool), _bucket(x.shape[0]), 1)
        zero = tf.constant(0.0)
        self._compiled(
            x,
            y,
            rows,
            weights,
            noise,
            tf.constant(1),
            lr,
            clip,
            noise_std,
            denom,
            zero,
            [],
            private,
            False,
        )

    @staticmethod
    def _sample_graph(
        generator: Any, n: Any, rate: Any, active: Any, noise_size: int
    ) -> tuple[Any, Any, Any]:
        """``active`` steps' Poisson masks ``[active, n]``, their sizes, and their standard
        normal noise ``[active, noise_size]`` (none for plain SGD). Drawn step by step, mask
        then noise, exactly as :meth:`~peer.training.dpsgd.PoissonTrainer._run_graph` draws
        them, so both loops take the same samples and noise from the same generator state."""
        import tensorflow as tf

        masks = tf.TensorArray(tf.bool, size=active, element_shape=[None])
        noise = tf.TensorArray(tf.float32, size=active, element_shape=[noise_size])
        for s in tf.range(active):
            masks = masks.write(s, generator.uniform([n], dtype=tf.float32) < rate)
            if noise_size:
                noise = noise.write(s, generator.normal([noise_size], dtype=tf.float32))
        stacked = masks.stack()
        counts = tf.reduce_sum(tf.cast(stacked, tf.int32), axis=1)
        return stacked, counts, noise.stack() if noise_size else tf.zeros([active, 0])

    def _steps_graph(
        self,
        x: Any,
        y: Any,
        rows: Any,
        weights: Any,
        noise: Any,
        active: Any,
        lr: Any,
        clip: Any,
        noise_std: Any,
        denom: Any,
        prox_mu: Any,
        anchors: list[Any],
        private: bool,
        proximal: bool,
    ) -> None:
        """``active`` steps; step ``s`` trains on rows ``rows[s]`` weighted by
        ``weights[s]`` (0 for padding) and standard normal noise ``noise[s]``."""
        import tensorflow as tf

        for s in tf.range(active):
            xb, yb, wb = tf.gather(x, rows[s]), tf.gather(y, rows[s]), weights[s]
            # FedProx's pull is taken at the step's starting point (read before the step).
            pulls = (
                [prox_mu * (v - a) for v, a in zip(self._variables, anchors, strict=True)]
                if proximal
                else []
            )
            if private:
                self._apply_dp(xb, yb, wb, noise[s], lr, clip, noise_std, denom)
            else:
                self._apply_sgd(xb, yb, wb, lr, denom)
            for variable, pull in zip(self._variables, pulls, strict=False):
                variable.assign_sub(lr * pull)


# At most this many sampling-mask values, and noise values, per chunk of steps (memory bound).
_CHUNK_BUDGET = 1 << 22


# The padded batch sizes: every size up to 8, then 4 per doubling (10, 12, 14, 16, 20, 24,
# ...), so at most 25 % of a padded batch is padding and a run compiles only for the few
# sizes its batches reach.
_BUCKETS: tuple[int, ...] = (*range(1, 9), *(m << k for k in range(1, 28) for m in (5, 6, 7, 8)))


def _bucket(count: int) -> int:
    """The padded batch size for ``count`` sampled examples (an empty batch gets 1 row)."""
    return _BUCKETS[bisect.bisect_left(_BUCKETS, max(count, 1))]


def _pad_batches(masks: Any, size: Any, steps: Any) -> tuple[Any, Any]:
    """Row indices ``[steps, size]`` and 0/1 weights of the sampled rows of each mask row
    (``masks``: bool ``[active <= steps, n]``, at most ``size`` true per row), in row
    order, padded with row 0 at weight 0 (and whole padding steps after ``active``)."""
    import tensorflow as tf

    hits = tf.where(masks)  # [k, 2]: (step, row) of every sampled example, row-major
    slots = tf.gather_nd(tf.cumsum(tf.cast(masks, tf.int64), axis=1, exclusive=True), hits)
    where = tf.stack([hits[:, 0], slots], axis=1)
    shape = tf.cast(tf.stack([steps, size]), tf.int64)
    rows = tf.scatter_nd(where, tf.cast(hits[:, 1], tf.int32), shape)
    weights = tf.scatter_nd(where, tf.ones_like(hits[:, 0], tf.float32), shape)
    return rows, weights
