"""Per-caller token buckets: how often an authenticated caller may make this peer work.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; each call
takes one. The clock is injected (``time.monotonic`` by default) so tests can step it.
Buckets of callers that have been idle long enough to be full again are forgotten, so the
table stays bounded by the callers active within one refill period (at most the roster).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RateLimiter"]


@dataclass
class RateLimiter:
    rate: float  # tokens per second
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # caller: (tokens, at)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a rate limiter needs a positive rate and a burst of at least 1")

    def take(self, caller: str) -> float:
        """Take a token for ``caller``: 0.0 when allowed, else the seconds until the next one."""
        now = self.clock()
        tokens, at = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[caller] = (tokens - 1.0, now)
        full_after = self.burst / self.rate
        for other, (_, seen) in list(self._buckets.items()):
            if now - seen > full_after:
                del self._buckets[other]
        return 0.0
