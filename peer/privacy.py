"""A hospital's privacy as it is: every charged release, composed over its whole history.

Each peer charges its ledger before any noisy value leaves it (``Ledger.charge_release``),
one charge per distinct released value, with the mechanism that produced it (a JSON event of
:mod:`peer.training.accounting`). This module composes them: the PLD accountant over every
event at one global δ (the figure budgets are enforced with), the RDP accountant as an
independent cross-check, and — for charges written before events existed — their ε by basic
composition. ``ceremony privacy --ledger`` and the dashboard show the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .ledger import ChargedRelease, Ledger
from .training.accounting import (
    GLOBAL_DELTA,
    PrivacyBudgetError,
    PrivacyEvent,
    composed_epsilon,
    epsilon_increase,
)

__all__ = [
    "PrivacyBudgetError",
    "PrivacyStatement",
    "compose_charges",
    "privacy_after",
    "privacy_statement",
]


@dataclass(frozen=True)
class PrivacyStatement:
    """What one hospital has spent, over every session in its ledger.

    Attributes:
        epsilon: composed ε at ``delta`` (PLD; plus charges without an event, added up).
        epsilon_rdp: the same composed with the RDP accountant (never below ``epsilon`` by
            more than discretization error; a cross-check).
        budget: the hospital's global budget (its ``policy.max_epsilon``), if known.
        releases: every charged release, oldest first (aborted attempts included).
    """

    peer_id: str
    delta: float
    epsilon: float
    epsilon_rdp: float
    legacy_epsilon: float
    budget: float | None
    releases: tuple[ChargedRelease, ...]

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.epsilon

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer_id,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "epsilon_rdp": self.epsilon_rdp,
            "epsilon_without_events": self.legacy_epsilon,
            "budget": self.budget,
            "remaining": self.remaining,
            "releases": [
                {
                    "session": r.session_id,
                    "round": r.round,
                    "attempt": r.attempt,
                    "kind": r.charge.kind.value,
                    "epsilon": r.charge.epsilon,
                    "event": None if r.charge.event is None else dict(r.charge.event),
                }
                for r in self.releases
            ],
        }


def privacy_statement(
    ledger: Ledger, peer_id: str, budget: float | None = None, delta: float = GLOBAL_DELTA
) -> PrivacyStatement:
    """Compose every release ``peer_id`` charged in ``ledger`` (all sessions).

    Raises:
        ValueError: a stored event is malformed.
    """
    releases = tuple(ledger.privacy_charges(peer_id))
    return compose_charges(peer_id, releases, budget, delta)


def compose_charges(
    peer_id: str,
    releases: Iterable[ChargedRelease],
    budget: float | None = None,
    delta: float = GLOBAL_DELTA,
) -> PrivacyStatement:
    """The statement of ``peer_id`` from its charged releases (read from its ledger).

    Raises:
        ValueError: a stored event is malformed.
    """
    mine = tuple(r for r in releases if r.charge.peer_id == peer_id)
    events, legacy = _history(mine)
    return PrivacyStatement(
        peer_id=peer_id,
        delta=delta,
        epsilon=composed_epsilon(events, delta) + legacy,
        epsilon_rdp=composed_epsilon(events, delta, "rdp") + legacy,
        legacy_epsilon=legacy,
        budget=budget,
        releases=mine,
    )


def privacy_after(
    ledger: Ledger, peer_id: str, events: list[PrivacyEvent], delta: float = GLOBAL_DELTA
) -> tuple[float, float]:
    """``(spent, after)``: ``peer_id``'s composed ε now, and with ``events`` released too.

    The budget checks use it: ``after`` must stay within the budget, and ``after - spent``
    is what the new release costs."""
    history, legacy = _history(ledger.privacy_charges(peer_id))
    before, after = epsilon_increase(history, events, delta)
    return before + legacy, after + legacy


def _history(releases: Iterable[ChargedRelease]) -> tuple[list[PrivacyEvent], float]:
    """The mechanism events of the charges, and the ε of charges without one (basic
    composition: ledgers written before events were stored)."""
    events: list[PrivacyEvent] = []
    legacy: list[float] = []
    for release in releases:
        if release.charge.event is None:
            legacy.append(release.charge.epsilon)
        else:
            events.append(dict(release.charge.event))  # type: ignore[arg-type]
    return events, math.fsum(legacy)
