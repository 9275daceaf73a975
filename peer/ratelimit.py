"""Per-caller token buckets: how often one authenticated caller may make this peer work.

An insider holds a valid certificate, so authentication alone does not bound what it can
ask. ``Status`` and ``Records`` read the ledger, ``Propose`` builds a payload; a flood of
them slows the peer for everyone (the operator's own polling included). Each caller gets a
bucket of ``burst`` tokens that refills at ``rate`` per second; a call without a token is
answered RESOURCE_EXHAUSTED at once, before any work. Honest use is far below the defaults:
an operator polls Status twice a second per peer, a peer asks each other peer a few times
per round.

The clock is injected (monotonic seconds), so tests drive time by hand.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "Limits", "RateLimiter", "TokenBucket"]


@dataclass(frozen=True)
class Limits:
    """Per-caller limits of a peer (the ``[limits]`` table of its configuration).

    Attributes:
        reads_per_second: Status/Records calls one caller may make per second, sustained.
        reads_burst: how many it may make at once after a quiet spell.
        hello_seconds: a RoundStream that has not sent its hello by then is closed;
            ``None``: the peer's stage deadline (``[timeouts] stage_seconds``).
        trust_poll_seconds: how often the roster and CRL files are checked for a change.
    """

    reads_per_second: float = 20.0
    reads_burst: int = 40
    hello_seconds: float | None = None
    trust_poll_seconds: float = 2.0


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate`` per second."""

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError(
                f"a token bucket needs rate > 0 and capacity >= 1 ({rate}, {capacity})"
            )
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.updated = now

    def take(self, now: float) -> bool:
        """Take one token if there is one; whether it was there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """One :class:`TokenBucket` per caller (callers are roster members: a bounded set)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, caller: str) -> bool:
        """Take a token for ``caller``; whether there was one."""
        return self.take(caller) == 0.0

    def take(self, caller: str) -> float:
        """Take a token for ``caller``: 0.0 when allowed, else the seconds until the next one."""
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = TokenBucket(self.rate, self.burst, now)
        if bucket.take(now):
            return 0.0
        return (1.0 - bucket.tokens) / bucket.rate


class Backoff:
    """Exponential back-off with full jitter, capped: wait a random time in
    ``[0, min(cap, base * 2**failures)]`` before the next try.

    Peers that failed together (a lying or dead aggregator) then retry spread out rather
    than in lock-step, and a fault that persists costs a few tries a minute, not hundreds.
    The jitter is not secret: ``uniform`` (``random.uniform`` by default) is injected for
    tests.
    """

    def __init__(
        self,
        base: float,
        cap: float,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._uniform = uniform

    def next_delay(self) -> float:
        """The wait before the next try; each call counts one more failure."""
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return self._uniform(0.0, ceiling)

    def reset(self) -> None:
        self.failures = 0
