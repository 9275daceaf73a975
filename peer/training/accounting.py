"""Privacy accounting for Poisson-sampled DP-SGD with Google's ``dp_accounting``.

Every local step of every round is one Poisson-sampled Gaussian mechanism
(sampling rate ``q``, noise multiplier ``sigma``); a hospital's total privacy loss is their
composition. The privacy loss distribution (PLD) accountant is the primary, tight one; the
Rényi (RDP) accountant is a looser, independent cross-check (its epsilon must never be below
PLD's by more than discretization error). Both use the add-or-remove-one neighbouring relation
that Poisson sampling matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..session import ProposalError

__all__ = [
    "GLOBAL_DELTA",
    "PrivacyBudget",
    "PrivacyBudgetError",
    "PrivacyEvent",
    "TrainingSpend",
    "calibrate_noise",
    "composed_epsilon",
    "epsilon",
    "epsilon_increase",
    "gaussian_event",
    "poisson_gaussian_event",
    "pure_event",
]

Accountant = Literal["pld", "rdp"]

# PLD discretization: 1e-4 gives epsilon within ~1e-3 of the exact value (and always an upper
# bound); it takes well under a second for tens of thousands of steps.
PLD_DISCRETIZATION = 1e-4


class PrivacyBudgetError(ProposalError):
    """A session or round would take this institution over its privacy budget, or spend
    privacy without the protection the policy demands; the peer refuses it (figures in the
    text). The one budget error of every payload (training, statistics) and of
    :class:`PrivacyBudget`; :mod:`peer.privacy` exports it."""


def _event(q: float, sigma: float, steps: int) -> object:
    import dp_accounting

    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling rate q must be in (0, 1], not {q}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    if not sigma > 0:
        raise ValueError(f"noise multiplier must be positive, not {sigma}")
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def _accountant(kind: Accountant, discretization: float = PLD_DISCRETIZATION) -> object:
    from dp_accounting import pld, rdp

    if kind == "pld":
        return pld.PLDAccountant(value_discretization_interval=discretization)
    if kind == "rdp":
        return rdp.RdpAccountant()
    raise ValueError(f"accountant must be 'pld' or 'rdp', not {kind!r}")


def epsilon(
    q: float, sigma: float, steps: int, delta: float, accountant: Accountant = "pld"
) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps at the given ``delta``."""
    return _epsilon_of([(q, sigma, steps)], delta, accountant)


def _epsilon_of(
    phases: list[tuple[float, float, int]], delta: float, accountant: Accountant
) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    acc = _accountant(accountant)
    for q, sigma, steps in phases:
        if steps:
            acc.compose(_event(q, sigma, steps))  # type: ignore[attr-defined]
    return float(acc.get_epsilon(delta))  # type: ignore[attr-defined]


def calibrate_noise(
    q: float,
    steps: int,
    delta: float,
    target_epsilon: float,
    accountant: Accountant = "pld",
    *,
    tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier (within ``tolerance``) whose epsilon is <= the target.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (a bracketed bisection on sigma). For PLD
    the bracket comes from an RDP calibration first: RDP's epsilon is never below PLD's, so
    the RDP sigma is enough for PLD, and the PLD search never evaluates a tiny sigma (whose
    privacy loss distribution is enormous and slow to compose).

    Raises:
        ValueError: the target is not positive.
    """
    import dp_accounting

    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be positive, not {target_epsilon}")
    _event(q, 1.0, steps)  # validates q and steps
    bracket: object = dp_accounting.LowerEndpointAndGuess(1e-2, 1.0)
    if accountant == "pld":
        upper = calibrate_noise(q, steps, delta, target_epsilon, "rdp", tolerance=tolerance)
        bracket = dp_accounting.ExplicitBracketInterval(0.5 * upper, upper + tolerance)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda sigma: _event(q, sigma, steps),
            target_epsilon,
            delta,
            bracket,
            tol=tolerance,
        )
    )


@dataclass(frozen=True, slots=True)
class TrainingSpend:
    """Steps taken with one (q, sigma) setting."""

    q: float
    sigma: float
    steps: int


@dataclass
class PrivacyBudget:
    """A hospital's (epsilon, delta) budget, composed over every local DP-SGD step it runs.

    Each peer keeps its own and checks it *before* training: a round whose steps would take
    the composed epsilon (PLD) over ``epsilon_limit`` is refused.

    Attributes:
        epsilon_limit: the most epsilon this hospital will ever spend on the data set.
        delta: the delta at which epsilon is reported.
        spends: every recorded training phase, oldest first.
    """

    epsilon_limit: float
    delta: float
    spends: list[TrainingSpend] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.epsilon_limit > 0 or not math.isfinite(self.epsilon_limit):
            raise ValueError(f"epsilon limit must be positive, not {self.epsilon_limit}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), not {self.delta}")

    def _phases(self, extra: TrainingSpend | None = None) -> list[tuple[float, float, int]]:
        spends = [*self.spends, extra] if extra is not None else self.spends
        return [(s.q, s.sigma, s.steps) for s in spends]

    def spent(self, accountant: Accountant = "pld") -> float:
        """Epsilon spent so far (0 before any step)."""
        if not any(s.steps for s in self.spends):
            return 0.0
        return _epsilon_of(self._phases(), self.delta, accountant)

    def epsilon_after(self, q: float, sigma: float, additional_steps: int) -> float:
        """Epsilon that would be spent after ``additional_steps`` more steps at ``(q, sigma)``."""
        return _epsilon_of(
            self._phases(TrainingSpend(q, sigma, additional_steps)), self.delta, "pld"
        )

    def would_exceed(self, q: float, sigma: float, additional_steps: int) -> bool:
        """True if ``additional_steps`` more steps would take epsilon over the limit."""
        return self.epsilon_after(q, sigma, additional_steps) > self.epsilon_limit

    def charge(self, q: float, sigma: float, steps: int) -> float:
        """Record ``steps`` steps and return the new epsilon spent.

        Raises:
            PrivacyBudgetError: the steps would exceed the limit; nothing is recorded.
        """
        after = self.epsilon_after(q, sigma, steps)
        if after > self.epsilon_limit:
            raise PrivacyBudgetError(
                f"{steps} more steps (q={q:.4g}, sigma={sigma:.4g}) would spend epsilon "
                f"{after:.4f} > limit {self.epsilon_limit:.4f} at delta={self.delta:g} "
                f"(spent so far {self.spent():.4f})"
            )
        self.spends.append(TrainingSpend(q, sigma, steps))
        return after

    def remaining(self) -> float:
        """Epsilon left before the limit."""
        return max(0.0, self.epsilon_limit - self.spent())


# --------------------------------------------------------------------------- charged events
#
# Every release a peer makes is charged in its ledger as a *mechanism event* (a small JSON
# object), so that its whole history can be composed by the accountant instead of adding up
# per-release epsilons:
#
#   {"mechanism": "poisson-gaussian", "q": q, "sigma": s, "steps": T}   DP-SGD (T steps)
#   {"mechanism": "gaussian", "sigma": s, "count": c}   c Gaussian releases, noise std / L2
#                                                       sensitivity = s
#   {"mechanism": "pure", "epsilon": e, "count": c}     c releases that are e-DP each
#                                                       (geometric / Laplace mechanisms)
#   {"mechanism": "composed", "events": [...]}          one release carrying several
#
# A pure e-DP release is composed as a discrete Laplace mechanism of sensitivity 1, whose
# privacy loss is +-e: that is the worst case of every e-DP mechanism, so the PLD figure is an
# upper bound whatever the geometric mechanism's sensitivity was.

PrivacyEvent = dict[str, float | int | str]

# The delta at which a hospital's whole history is reported and its budget enforced.
GLOBAL_DELTA = 1e-5


def poisson_gaussian_event(q: float, sigma: float, steps: int) -> PrivacyEvent:
    _event(q, sigma, steps)  # validates
    return {"mechanism": "poisson-gaussian", "q": float(q), "sigma": float(sigma), "steps": steps}


def gaussian_event(sigma: float, count: int = 1) -> PrivacyEvent:
    if not sigma > 0 or count < 1:
        raise ValueError(f"a Gaussian release needs sigma > 0 and count >= 1: {sigma}, {count}")
    return {"mechanism": "gaussian", "sigma": float(sigma), "count": int(count)}


def pure_event(epsilon: float, count: int = 1) -> PrivacyEvent:
    if not (epsilon > 0 and math.isfinite(epsilon)) or count < 1:
        raise ValueError(f"a pure-DP release needs 0 < epsilon < inf: {epsilon}, {count}")
    return {"mechanism": "pure", "epsilon": float(epsilon), "count": int(count)}


def _dp_event(event: object, accountant: Accountant) -> object | None:
    """The dp_accounting event of a stored event; None for a pure event under RDP (those
    are added by basic composition in the RDP cross-check)."""
    import dp_accounting
    from dp_accounting import dp_event

    if not isinstance(event, dict):
        raise ValueError(f"a privacy event must be a JSON object, not {event!r}")
    kind = event.get("mechanism")
    try:
        if kind == "poisson-gaussian":
            return _event(float(event["q"]), float(event["sigma"]), int(event["steps"]))
        if kind == "gaussian":
            sigma, count = float(event["sigma"]), int(event["count"])
            if not sigma > 0 or count < 1:
                raise ValueError(f"bad Gaussian event {event}")
            gaussian: object = dp_accounting.SelfComposedDpEvent(
                dp_accounting.GaussianDpEvent(sigma), count
            )
            return gaussian
        if kind == "pure":
            eps, count = float(event["epsilon"]), int(event["count"])
            if not (eps > 0 and math.isfinite(eps)) or count < 1:
                raise ValueError(f"bad pure-DP event {event}")
            if accountant == "rdp":
                return None
            pure: object = dp_accounting.SelfComposedDpEvent(
                dp_event.DiscreteLaplaceDpEvent(eps, 1), count
            )
            return pure
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed privacy event {event}: {error}") from None
    raise ValueError(f"unknown privacy mechanism {kind!r} in {event}")


def _flatten(events: list[PrivacyEvent]) -> list[PrivacyEvent]:
    flat: list[PrivacyEvent] = []
    for event in events:
        if isinstance(event, dict) and event.get("mechanism") == "composed":
            inner = event.get("events")
            if not isinstance(inner, list):
                raise ValueError(f"a composed privacy event needs a list of events: {event}")
            flat.extend(_flatten(inner))
        else:
            flat.append(event)
    return flat


def _grouped(events: list[PrivacyEvent]) -> list[PrivacyEvent]:
    """Identical mechanisms merged into one self-composition (the same privacy loss, and
    PLD composes a k-fold self-composition far faster than k separate events)."""
    counts: dict[tuple[object, ...], int] = {}
    for event in events:
        if not isinstance(event, dict):
            raise ValueError(f"a privacy event must be a JSON object, not {event!r}")
        kind = event.get("mechanism")
        try:
            if kind == "poisson-gaussian":
                key: tuple[object, ...] = (kind, float(event["q"]), float(event["sigma"]))
                repeat = int(event["steps"])
            elif kind == "gaussian":
                key, repeat = (kind, float(event["sigma"])), int(event["count"])
            elif kind == "pure":
                key, repeat = (kind, float(event["epsilon"])), int(event["count"])
            else:
                raise ValueError(f"unknown privacy mechanism {kind!r} in {event}")
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed privacy event {event}: {error}") from None
        counts[key] = counts.get(key, 0) + repeat
    grouped: list[PrivacyEvent] = []
    for key, repeat in counts.items():
        if key[0] == "poisson-gaussian":
            grouped.append({"mechanism": key[0], "q": key[1], "sigma": key[2], "steps": repeat})  # type: ignore[dict-item]
        elif key[0] == "gaussian":
            grouped.append({"mechanism": key[0], "sigma": key[1], "count": repeat})  # type: ignore[dict-item]
        else:
            grouped.append({"mechanism": key[0], "epsilon": key[1], "count": repeat})  # type: ignore[dict-item]
    return grouped


def composed_epsilon(
    events: list[PrivacyEvent], delta: float = GLOBAL_DELTA, accountant: Accountant = "pld"
) -> float:
    """Epsilon at ``delta`` of the composition of every event (0 for none).

    ``"pld"`` is the tight figure the peers enforce; ``"rdp"`` is the cross-check, where pure
    events are added by basic composition (valid, looser).

    Raises:
        ValueError: a malformed event.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    if not events:
        return 0.0
    acc = _accountant(accountant)
    basic = 0.0
    composed = False
    for stored in _grouped(_flatten(events)):
        dp = _dp_event(stored, accountant)
        if dp is None:
            basic += float(stored["epsilon"]) * int(stored["count"])
        else:
            acc.compose(dp)  # type: ignore[attr-defined]
            composed = True
    return (float(acc.get_epsilon(delta)) if composed else 0.0) + basic  # type: ignore[attr-defined]


def epsilon_increase(
    history: list[PrivacyEvent], new: list[PrivacyEvent], delta: float = GLOBAL_DELTA
) -> tuple[float, float]:
    """``(before, after)``: the composed PLD epsilon of ``history`` and of ``history + new``."""
    before = composed_epsilon(history, delta)
    return before, composed_epsilon([*history, *new], delta)
