"""Per-example losses of the three tasks a session can train, as ``loss(labels, output)``.

Every DP-SGD trainer (:class:`peer.training.DPSGD`, :class:`peer.training.LayerwiseDPSGD`)
takes one of these: it needs the loss *per example* (per-example clipping), so each returns a
vector of shape ``[batch]``. The labels arrive as float32 (the trainers' one label dtype):

- binary: 0/1, the model outputs one logit;
- multi-class: the class index ``0..K-1``, the model outputs ``K`` logits (softmax);
- regression: the target scaled by the session's public ``target_bound`` (so within
  ``[-1, 1]``), the model outputs one value; half the squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Loss", "binary_logit_loss", "softmax_loss", "squared_loss"]

Loss = Callable[[Any, Any], Any]


def binary_logit_loss(y: Any, output: Any) -> Any:
    """Per-example binary cross-entropy of a one-logit output (the built-in task)."""
    import tensorflow as tf

    return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=tf.reshape(output, [-1]))


def softmax_loss(y: Any, output: Any) -> Any:
    """Per-example softmax cross-entropy of ``K`` logits against the class index ``y``."""
    import tensorflow as tf

    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y, tf.int32), logits=output
    )


def squared_loss(y: Any, output: Any) -> Any:
    """Per-example half squared error of a one-value output (regression)."""
    import tensorflow as tf

    return 0.5 * tf.square(tf.reshape(output, [-1]) - y)
