"""Server optimizers: how every peer turns the agreed average update into the next global model.

Theory of operation. A training round's secure sum gives every peer the same average local
update ``delta`` (the *pseudo-gradient*: where the hospitals, on average, moved the model).
FedAvg adds it to the global model. The adaptive optimizers of Reddi et al., "Adaptive
Federated Optimization" (ICLR 2021, Algorithm 2), keep two moments across rounds and take a
per-coordinate scaled step instead::

    m_t = beta1 * m_{t-1} + (1 - beta1) * delta
    v_t = beta2 * v_{t-1} + (1 - beta2) * delta^2                         (FedAdam)
    v_t = v_{t-1} - (1 - beta2) * delta^2 * sign(v_{t-1} - delta^2)       (FedYogi)
    w_t = w_{t-1} + server_lr * m_t / (sqrt(v_t) + tau)

with ``m_0 = 0`` and ``v_0 = tau^2`` (the paper's ``v_{-1} >= tau^2``; no bias correction,
as in the paper). FedAvg is ``w_t = w_{t-1} + server_lr * delta`` (``server_lr = 1`` is
plain FedAvg, bit for bit the rule used before this module existed).

There is no server: every peer runs :meth:`ServerOptimizer.step` on the same agreed
aggregate and must get the same bytes, because each signs their hash. Hence the rules here
are pure numpy element-wise float64 arithmetic (IEEE-754 correctly rounded ``+ - * / sqrt``,
no reductions whose order could vary), and the state they carry between rounds is not kept
in memory: it is read back from the previous agreed round's checkpoint, which is signed with
the model (see :mod:`peer.payloads.training`). A restarted peer, or one that fetched the
agreed records it missed, therefore continues from exactly the same moments as the others.

State layout (float32, appended to a training round's checkpoint after the weights): nothing
for FedAvg, ``m ‖ v`` for FedAdam and FedYogi.

Robustness: the payload clamps ``delta`` to the public per-coordinate bound ``U`` before it
gets here, so ``|m| <= U`` and ``v > 0`` always (FedYogi's update keeps ``v >= beta2 *
v_{t-1}``), and one adaptive step moves a coordinate by at most ``server_lr * U / tau``
(:meth:`ServerOptimizer.step_bound`) whatever the contributions were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "OPTIMIZER_KEYS",
    "OptimizerKind",
    "ServerOptimizer",
    "ServerState",
]

Vector = npt.NDArray[np.float64]

# The session keys this module owns (the training payload passes them through).
OPTIMIZER_KEYS = ("optimizer", "server_lr", "beta1", "beta2", "tau")


class OptimizerKind(StrEnum):
    FEDAVG = "fedavg"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


@dataclass(frozen=True, slots=True)
class ServerState:
    """The moments carried from round to round (empty arrays for FedAvg)."""

    m: Vector
    v: Vector


@dataclass(frozen=True, slots=True)
class ServerOptimizer:
    """The server optimizer of a session (public, in the signed proposal).

    Defaults are those of Reddi et al. (2021) for the adaptive rules; ``server_lr`` needs
    tuning for them (the paper's best values are often 10^-2 to 10^-1, far below FedAvg's 1).
    """

    kind: OptimizerKind = OptimizerKind.FEDAVG
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ServerOptimizer:
        """The optimizer declared by a session payload's keys (FedAvg when none).

        Raises:
            ValueError: an unknown optimizer, a parameter of the wrong type or out of range,
                or an adaptive parameter given for FedAvg; the message names the key.
        """
        name = payload.get("optimizer", "fedavg")
        try:
            kind = OptimizerKind(name)
        except ValueError:
            choices = ", ".join(repr(k.value) for k in OptimizerKind)
            raise ValueError(f"optimizer must be one of {choices}, not {name!r}") from None
        values: dict[str, float] = {}
        for key in ("server_lr", "beta1", "beta2", "tau"):
            if key not in payload:
                continue
            value = payload[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, not {value!r}")
            values[key] = float(value)
        moments = sorted(set(values) & {"beta1", "beta2", "tau"})
        if kind is OptimizerKind.FEDAVG and moments:
            raise ValueError(
                f"{', '.join(moments)} only apply to optimizer 'fedadam' or 'fedyogi', not 'fedavg'"
            )
        optimizer = cls(kind, **values)
        optimizer.validate()
        return optimizer

    def validate(self) -> None:
        """Raises ValueError naming every parameter out of its range."""
        checks = {
            "server_lr (> 0, finite)": math.isfinite(self.server_lr) and self.server_lr > 0,
            "beta1 (in [0, 1))": 0.0 <= self.beta1 < 1.0,
            "beta2 (in [0, 1))": 0.0 <= self.beta2 < 1.0,
            "tau (> 0, finite)": math.isfinite(self.tau) and self.tau > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {', '.join(bad)}")

    @property
    def adaptive(self) -> bool:
        return self.kind is not OptimizerKind.FEDAVG

    def payload(self) -> dict[str, Any]:
        """The session keys that declare this optimizer (inverse of :meth:`from_payload`)."""
        keys: dict[str, Any] = {"optimizer": self.kind.value, "server_lr": self.server_lr}
        if self.adaptive:
            keys.update(beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return keys

    # ------------------------------------------------------------------ state

    def state_length(self, n_parameters: int) -> int:
        """float32 values of state stored after the weights in a round's checkpoint."""
        return 2 * n_parameters if self.adaptive else 0

    def initial_state(self, n_parameters: int) -> ServerState:
        if not self.adaptive:
            return ServerState(np.zeros(0), np.zeros(0))
        return ServerState(np.zeros(n_parameters), np.full(n_parameters, self.tau**2))

    def encode_state(self, state: ServerState) -> npt.NDArray[np.float32]:
        """The state as stored in the checkpoint (float32 ``m ‖ v``)."""
        return np.concatenate((state.m, state.v)).astype(np.float32)

    def decode_state(self, stored: npt.ArrayLike, n_parameters: int) -> ServerState:
        """The state read back from a checkpoint's tail.

        Raises:
            ValueError: the stored state has the wrong length (not this optimizer's).
        """
        values = np.asarray(stored, dtype=np.float64)
        expected = self.state_length(n_parameters)
        if values.shape != (expected,):
            raise ValueError(
                f"{self.kind.value} state has {values.size} values, expected {expected}"
            )
        if not self.adaptive:
            return self.initial_state(n_parameters)
        return ServerState(values[:n_parameters], values[n_parameters:])

    # ------------------------------------------------------------------ the rule

    def step(
        self, weights: npt.ArrayLike, state: ServerState, delta: npt.ArrayLike
    ) -> tuple[Vector, ServerState]:
        """The next global model and state from the agreed average update ``delta``.

        Deterministic: element-wise float64 arithmetic only (see the module docstring).
        """
        w = np.asarray(weights, dtype=np.float64)
        d = np.asarray(delta, dtype=np.float64)
        if d.shape != w.shape:
            raise ValueError(f"update has shape {d.shape}, the model {w.shape}")
        if not self.adaptive:
            return w + self.server_lr * d, state
        m = self.beta1 * state.m + (1.0 - self.beta1) * d
        squared = np.square(d)
        if self.kind is OptimizerKind.FEDADAM:
            v = self.beta2 * state.v + (1.0 - self.beta2) * squared
        else:
            v = state.v - (1.0 - self.beta2) * squared * np.sign(state.v - squared)
        new = w + self.server_lr * m / (np.sqrt(v) + self.tau)
        return new, ServerState(m, v)

    def step_bound(self, update_bound: float) -> float:
        """The most one step moves a coordinate when ``|delta_j| <= update_bound``."""
        if not self.adaptive:
            return self.server_lr * update_bound
        return self.server_lr * update_bound / self.tau
