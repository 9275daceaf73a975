"""The arguments of one :meth:`peer.training.dpsgd.PoissonTrainer.run`, shared by its two
loops (the graph loop in :mod:`peer.training.dpsgd`, the padded XLA loop in
:mod:`peer.training.padded_xla`); a module of its own so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RunArgs"]


@dataclass(frozen=True)
class RunArgs:
    """The arguments of one :meth:`PoissonTrainer.run`, as its loops take them: tensors
    (the data, the step count and the float32 scalars) and the two Python flags that select
    the traced graph (``private``: DP-SGD rather than plain SGD; ``proximal``: FedProx's pull
    is applied).

    It is a nested structure for TensorFlow (``__tf_flatten__``), so a ``tf.function`` takes
    the tensors as graph inputs and traces once per value of the flags, as it would with
    them as separate arguments.
    """

    x: Any
    y: Any
    steps: Any  # int32 scalar
    rate: Any  # the Poisson sampling rate q
    lr: Any
    clip: Any  # the clip norm C (1.0, unused, for plain SGD)
    noise_std: Any  # sigma C (0 for plain SGD)
    denom: Any  # the expected batch size q N
    prox_mu: Any
    private: bool
    proximal: bool

    def __tf_flatten__(self) -> tuple[tuple[bool, bool], tuple[Any, ...]]:
        return (self.private, self.proximal), tuple(getattr(self, f) for f in _RUN_TENSORS)

    @classmethod
    def __tf_unflatten__(cls, flags: tuple[bool, bool], tensors: tuple[Any, ...]) -> RunArgs:
        private, proximal = flags
        fields = dict(zip(_RUN_TENSORS, tensors, strict=True))
        return cls(**fields, private=private, proximal=proximal)


# RunArgs' tensor fields, in the order its TensorFlow flattening lists them.
_RUN_TENSORS = ("x", "y", "steps", "rate", "lr", "clip", "noise_std", "denom", "prox_mu")
